"""The Telegram bot: the whole portrait journey in a chat, built on :mod:`likeness.client` only.

``likeness bot`` runs it (``LIKENESS_TELEGRAM_TOKEN``, ``LIKENESS_API_URL`` and a ``bot``-role
``LIKENESS_API_KEY``). Modules: :mod:`~likeness.bot.config` (settings), :mod:`~likeness.bot.store`
(conversation state and pending jobs: Redis or a local SQLite file), :mod:`~likeness.bot.texts`
(every sentence, English and Russian through gettext), :mod:`~likeness.bot.service` (what a user
may do, always scoped to ``tg:<user id>``), :mod:`~likeness.bot.tracker` (one status message per
job, results delivered when it ends, resumed after a restart), :mod:`~likeness.bot.handlers`
(the conversation) and :mod:`~likeness.bot.runner` (polling or webhook).
"""

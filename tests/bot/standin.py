"""A local stand-in for Telegram's Bot API: the methods the bot uses, real multipart uploads,
scripted user updates and a recording of everything the bot sent.

Telegram cannot be reached from the test machines, so the real aiogram bot is pointed at this
server with its custom API server setting (``LIKENESS_TELEGRAM_API_URL`` -> ``TelegramAPIServer``).
It runs an aiohttp server in a thread of the test process::

    with BotApiStandIn() as tg:
        user = tg.user(1001, "Grace", language="en")
        tg.send_text(user, "/start")
        reply = tg.wait_for(lambda c: c.method == "sendMessage" and c.chat_id == user.id)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

TOKEN = "123456:TEST-standin-token"
BOT_USER = {"id": 123456, "is_bot": True, "first_name": "Likeness", "username": "likeness_test_bot"}
JSON_FIELDS = {"reply_markup", "media", "allowed_updates", "reply_parameters", "link_preview_options", "entities"}


@dataclass(frozen=True)
class User:
    id: int
    first_name: str
    language: str = "en"

    def json(self) -> dict[str, Any]:
        return {"id": self.id, "is_bot": False, "first_name": self.first_name, "language_code": self.language}


@dataclass
class Call:
    """One Bot API request the bot made: its method, fields, uploaded files, and our answer."""

    method: str
    params: dict[str, Any]
    files: dict[str, tuple[str, bytes]]
    at: float
    result: Any = None
    status: int = 200

    @property
    def chat_id(self) -> int | None:
        value = self.params.get("chat_id")
        return int(value) if value is not None else None

    @property
    def text(self) -> str:
        return str(self.params.get("text") or self.params.get("caption") or "")

    @property
    def buttons(self) -> list[tuple[str, str]]:
        markup = self.params.get("reply_markup") or {}
        return [(b["text"], b.get("callback_data", "")) for row in markup.get("inline_keyboard", []) for b in row]


@dataclass
class _Failure:
    method: str
    status: int
    description: str
    retry_after: int | None
    times: int


@dataclass
class _State:
    updates: list[dict] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # file_id -> (file_path, bytes)
    messages: dict[tuple[int, int], dict] = field(default_factory=dict)  # (chat, message id) -> message
    failures: list[_Failure] = field(default_factory=list)
    webhook: str | None = None


class BotApiStandIn:
    def __init__(self, token: str = TOKEN):
        self.token = token
        self.state = _State()
        self.lock = threading.RLock()
        self._update_ids = itertools.count(1)
        self._message_ids = itertools.count(1000)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    # ---- server -------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> BotApiStandIn:
        started = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(started,), daemon=True, name="bot-api-standin")
        self._thread.start()
        if not started.wait(30):
            raise RuntimeError("the Bot API stand-in did not start")
        return self

    def __exit__(self, *exc) -> None:
        if self._loop is not None:
            with contextlib.suppress(TimeoutError):
                asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _shutdown(self) -> None:
        await self._runner.cleanup()
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in pending:  # long polls still waiting
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def _serve(self, started: threading.Event) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/bot{token}/{method}", self._method)
        app.router.add_get("/file/bot{token}/{path:.+}", self._file)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        started.set()
        self._loop.run_forever()

    async def _method(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return web.json_response({"ok": False, "error_code": 401, "description": "Unauthorized"}, status=401)
        method = request.match_info["method"]
        params, files = await _read_form(request)
        call = Call(method, params, files, time.monotonic())
        with self.lock:
            failure = next((f for f in self.state.failures if f.method == method and f.times > 0), None)
            if failure is not None:
                failure.times -= 1
                self.state.calls.append(call)
                call.status = failure.status
                body = {"ok": False, "error_code": failure.status, "description": failure.description}
                if failure.retry_after is not None:
                    body["parameters"] = {"retry_after": failure.retry_after}
                return web.json_response(body, status=failure.status)
        if method == "getUpdates":
            result = await self._get_updates(params)
        else:
            handler = getattr(self, "_m_" + method, None)
            if handler is None:
                return web.json_response({"ok": False, "error_code": 404, "description": "Not Found: method"},
                                         status=404)
            with self.lock:
                result = handler(params, files)
        call.result = result
        with self.lock:
            if method != "getUpdates" or result:
                self.state.calls.append(call)
        return web.json_response({"ok": True, "result": result})

    async def _file(self, request: web.Request) -> web.Response:
        path = request.match_info["path"]
        with self.lock:
            found = next((data for p, data in self.state.files.values() if p == path), None)
        if found is None:
            return web.Response(status=404)
        return web.Response(body=found, content_type="application/octet-stream")

    async def _get_updates(self, params: dict[str, Any]) -> list[dict]:
        offset = int(params.get("offset") or 0)
        deadline = time.monotonic() + min(float(params.get("timeout") or 0), 30)
        while True:
            with self.lock:
                self.state.updates = [u for u in self.state.updates if u["update_id"] >= offset]
                if self.state.updates or time.monotonic() >= deadline:
                    return list(self.state.updates)
            await asyncio.sleep(0.05)

    # ---- Bot API methods ----------------------------------------------------------------------------------

    def _m_getMe(self, params, files):  # noqa: N802 - Bot API names
        return BOT_USER

    def _m_deleteWebhook(self, params, files):  # noqa: N802
        self.state.webhook = None
        return True

    def _m_setWebhook(self, params, files):  # noqa: N802
        self.state.webhook = params.get("url")
        return True

    def _m_setMyCommands(self, params, files):  # noqa: N802
        return True

    def _m_answerCallbackQuery(self, params, files):  # noqa: N802
        return True

    def _m_getFile(self, params, files):  # noqa: N802
        file_id = params["file_id"]
        path, data = self.state.files[file_id]
        return {"file_id": file_id, "file_unique_id": file_id[:16], "file_size": len(data), "file_path": path}

    def _message(self, chat_id: int, **content) -> dict:
        message = {"message_id": next(self._message_ids), "date": int(time.time()),
                   "chat": {"id": chat_id, "type": "private"}, "from": BOT_USER, **content}
        self.state.messages[(chat_id, message["message_id"])] = message
        return message

    def _m_sendMessage(self, params, files):  # noqa: N802
        extra = {"reply_markup": params["reply_markup"]} if params.get("reply_markup") else {}
        return self._message(int(params["chat_id"]), text=params["text"], **extra)

    def _m_editMessageText(self, params, files):  # noqa: N802
        key = (int(params["chat_id"]), int(params["message_id"]))
        message = self.state.messages.get(key)
        if message is None:
            raise web.HTTPBadRequest(text=json.dumps({"ok": False, "error_code": 400,
                                                      "description": "Bad Request: message to edit not found"}),
                                     content_type="application/json")
        message["text"] = params["text"]
        return message

    def _stored(self, field_value: str, files: dict, kind: str) -> tuple[str, bytes, str]:
        """An uploaded file (``attach://name`` or a multipart field) kept like Telegram keeps files."""
        name = field_value[len("attach://"):] if field_value.startswith("attach://") else field_value
        filename, data = files[name]
        file_id = f"{kind}-{uuid.uuid4().hex}"
        self.state.files[file_id] = (f"{kind}s/{file_id}", data)
        return file_id, data, filename

    def _photo_sizes(self, file_id: str, data: bytes) -> list[dict]:
        import io

        from PIL import Image

        try:
            width, height = Image.open(io.BytesIO(data)).size
        except OSError:  # not a picture: Telegram would not have made it a photo, but let a test try
            width, height = 640, 480
        return [{"file_id": file_id, "file_unique_id": file_id[:16], "width": width, "height": height,
                 "file_size": len(data)}]

    def _m_sendPhoto(self, params, files):  # noqa: N802
        file_id, data, _ = self._stored(params.get("photo") or "photo", files, "photo")
        return self._message(int(params["chat_id"]), photo=self._photo_sizes(file_id, data),
                             caption=params.get("caption"))

    def _m_sendDocument(self, params, files):  # noqa: N802
        file_id, data, filename = self._stored(params.get("document") or "document", files, "document")
        return self._message(int(params["chat_id"]), caption=params.get("caption"), document={
            "file_id": file_id, "file_unique_id": file_id[:16], "file_name": filename, "file_size": len(data)})

    def _m_sendMediaGroup(self, params, files):  # noqa: N802
        chat_id, group = int(params["chat_id"]), uuid.uuid4().hex[:12]
        sent = []
        for media in params["media"]:
            file_id, data, filename = self._stored(media["media"], files, media["type"])
            content = ({"photo": self._photo_sizes(file_id, data)} if media["type"] == "photo" else
                       {"document": {"file_id": file_id, "file_unique_id": file_id[:16], "file_name": filename,
                                     "file_size": len(data)}})
            sent.append(self._message(chat_id, media_group_id=group, caption=media.get("caption"), **content))
        return sent

    # ---- the script: what users do -----------------------------------------------------------------------

    def user(self, user_id: int, first_name: str = "Test", language: str = "en") -> User:
        return User(user_id, first_name, language)

    def _push(self, **update) -> dict:
        with self.lock:
            update = {"update_id": next(self._update_ids), **update}
            self.state.updates.append(update)
            return update

    def _user_message(self, user: User, **content) -> dict:
        message = {"message_id": next(self._message_ids), "date": int(time.time()), "from": user.json(),
                   "chat": {"id": user.id, "type": "private", "first_name": user.first_name}, **content}
        with self.lock:
            self.state.messages[(user.id, message["message_id"])] = message
        return message

    def send_text(self, user: User, text: str) -> dict:
        entities = [{"type": "bot_command", "offset": 0, "length": len(text.split()[0])}] if text.startswith("/") \
            else None
        message = self._user_message(user, text=text, **({"entities": entities} if entities else {}))
        self._push(message=message)
        return message

    def _user_file(self, data: bytes, kind: str) -> str:
        file_id = f"user-{kind}-{uuid.uuid4().hex}"
        with self.lock:
            self.state.files[file_id] = (f"{kind}s/{file_id}.bin", data)
        return file_id

    def send_photo(self, user: User, data: bytes, media_group_id: str | None = None, size: int | None = None) -> dict:
        """A compressed photo (Telegram sends several sizes; the bot should pick the largest)."""
        file_id = self._user_file(data, "photo")
        sizes = self._photo_sizes(file_id, data)
        thumb_id = self._user_file(data[: max(1, len(data) // 10)], "photo")  # Telegram lists a small size first
        sizes = [{"file_id": thumb_id, "file_unique_id": thumb_id[:16], "width": 90, "height": 90,
                  "file_size": len(data) // 10}, {**sizes[0], "file_size": size or len(data)}]
        extra = {"media_group_id": media_group_id} if media_group_id else {}
        message = self._user_message(user, photo=sizes, **extra)
        self._push(message=message)
        return message

    def send_document(self, user: User, data: bytes, filename: str, mime_type: str,
                      size: int | None = None) -> dict:
        """A file (full-size original, HEIC...); ``size`` overrides the size Telegram reports."""
        file_id = self._user_file(data, "document")
        message = self._user_message(user, document={"file_id": file_id, "file_unique_id": file_id[:16],
                                                     "file_name": filename, "mime_type": mime_type,
                                                     "file_size": size if size is not None else len(data)})
        self._push(message=message)
        return message

    def press(self, user: User, call: Call | dict, data: str) -> None:
        """The user presses the inline button with ``data`` under the bot's message ``call``."""
        message = call.result if isinstance(call, Call) else call
        self._push(callback_query={"id": uuid.uuid4().hex[:16], "from": user.json(), "chat_instance": str(user.id),
                                   "message": message, "data": data})

    def fail(self, method: str, status: int = 429, retry_after: int | None = 2, times: int = 1,
             description: str = "Too Many Requests: retry after 2") -> None:
        with self.lock:
            self.state.failures.append(_Failure(method, status, description, retry_after, times))

    # ---- what the bot did ----------------------------------------------------------------------------------

    def calls(self, method: str | None = None, chat_id: int | None = None) -> list[Call]:
        with self.lock:
            return [c for c in self.state.calls if (method is None or c.method == method)
                    and (chat_id is None or c.chat_id == chat_id) and c.status == 200]

    def wait_for(self, predicate: Callable[[Call], bool], timeout_s: float = 60, after: int = 0,
                 what: str = "a call") -> Call:
        """The first successful call (from index ``after`` on) matching ``predicate``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                for call in self.state.calls[after:]:
                    if call.status == 200 and predicate(call):
                        return call
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; the bot sent:\n" + self.transcript())

    def mark(self) -> int:
        with self.lock:
            return len(self.state.calls)

    def transcript(self, last: int = 40) -> str:
        with self.lock:
            calls = self.state.calls[-last:]
        return "\n".join(f"  {c.method} chat={c.chat_id} status={c.status} {c.text[:150]!r} {c.buttons or ''}"
                         for c in calls)


async def _read_form(request: web.Request) -> tuple[dict[str, Any], dict[str, tuple[str, bytes]]]:
    params: dict[str, Any] = {}
    files: dict[str, tuple[str, bytes]] = {}
    if request.content_type == "application/json":
        return await request.json(), files
    form = await request.post()
    for key, value in form.items():
        if isinstance(value, web.FileField):
            files[key] = (value.filename, value.file.read())
        elif key in JSON_FIELDS:
            params[key] = json.loads(value)
        else:
            params[key] = value
    return params, files

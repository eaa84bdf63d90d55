"""Inline keyboards. Button data names an action and at most a style: never an id of any record."""

from __future__ import annotations

from aiogram.types import InlineKeyboardButton, InlineKeyboardMarkup
from aiogram.utils.i18n import gettext as _

from likeness.client import Style

TRAIN = "train"
STYLES = "styles"
STYLE = "style:"  # + style name
MORE = "more:"  # + style name
DELETE_YES = "delete:yes"
DELETE_NO = "delete:no"


def train() -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup(inline_keyboard=[[InlineKeyboardButton(text=_("Train"), callback_data=TRAIN)]])


def styles(items: list[Style]) -> InlineKeyboardMarkup:
    buttons = [InlineKeyboardButton(text=s.title or s.name, callback_data=STYLE + s.name) for s in items
               if len((STYLE + s.name).encode()) <= 64]  # Telegram's limit on button data
    return InlineKeyboardMarkup(inline_keyboard=[buttons[i:i + 2] for i in range(0, len(buttons), 2)])


def after_results(style: str) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup(inline_keyboard=[[
        InlineKeyboardButton(text=_("More in this style"), callback_data=MORE + style),
        InlineKeyboardButton(text=_("Another style"), callback_data=STYLES),
    ]])


def confirm_delete() -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup(inline_keyboard=[[
        InlineKeyboardButton(text=_("Yes, delete everything"), callback_data=DELETE_YES),
        InlineKeyboardButton(text=_("No, keep it"), callback_data=DELETE_NO),
    ]])

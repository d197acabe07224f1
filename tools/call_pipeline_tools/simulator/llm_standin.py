"""Deterministic stand-in for the DashScope model / Bailian app that writes follow-up notes.

Given the request messages (or an app ``prompt``), it finds what the *customer* said and answers the
follow-up JSON of docs/contract.md, "LLM answer"::

    {"leads_remark": "...", "is_interested": 0 | 1 | 2, "next_follow_time": "YYYY-MM-DD HH:MM:SS" | null}

Finding the customer's words, in order:

0. if the text has ``<transcript>…</transcript>`` (or ``<conversation>``) blocks, only their content counts;
1. a JSON array of conversation entries anywhere in the user text (``[{"Speaker": ..., "Script": ...}]``,
   also ``role``/``content`` or ``speaker``/``text``; ASCII-escaped JSON works): the non-robot entries;
2. else lines prefixed ``客户:`` / ``用户:`` / ``Contact:`` / ``Customer:`` (full- or half-width colon);
3. else the whole user text.

Verdict from those words: a not-interested keyword (不需要, 已经买了, 没兴趣, 不感兴趣, 别再打, 不用了,
…) → 2 with ``next_follow_time`` null; else an interested keyword (价格, 多少钱, 试驾, 优惠, 感兴趣,
明天下午, 到店, 报价, …) → 1 with ``next_follow_time`` = the prompt's current time + 1 day at 14:00:00;
else 0 with null. The current time is the first ``YYYY-MM-DD HH:MM[:SS]`` after 当前时间 / 现在时间 /
现在是 / current time / now in any message; without one, now in Asia/Shanghai.

It never obeys the transcript: a customer line that reads like an instruction (忽略, 指令, 标记为,
ignore, instruction, system prompt, …) is left out of the verdict, and the remark notes that it was
ignored.

Trigger phrases — put one anywhere in the request text (e.g. as a customer line) to force a bad answer:

* ``[[llm:garbage]]``        content ``抱歉，我无法回答`` (not JSON)
* ``[[llm:fenced]]``         a valid answer wrapped in a ```json … ``` fence
* ``[[llm:out_of_range]]``   ``is_interested`` 5
* ``[[llm:string_one]]``     ``is_interested`` ``"1"`` (a string), with a valid future time
* ``[[llm:date_words]]``     ``is_interested`` 1, ``next_follow_time`` ``"明天下午"``
* ``[[llm:past_date]]``      ``is_interested`` 1, ``next_follow_time`` ``"2001-01-01 14:00:00"``
* ``[[llm:empty_remark]]``   ``leads_remark`` ``""``
* ``[[llm:long_remark]]``    ``leads_remark`` of 1,500 characters
* ``[[llm:missing_field]]``  only ``leads_remark``, no other keys
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

SHANGHAI = timezone(timedelta(hours=8))  # no DST in China, so a fixed offset needs no tz database

NOT_INTERESTED = {
    "已经买了": "表示已经购车", "买过了": "表示已经购车",
    "别再打": "要求不要再来电", "不要再打": "要求不要再来电",
    "不感兴趣": "表示不感兴趣", "没兴趣": "表示没有兴趣", "不需要": "表示不需要", "不用了": "表示不需要",
    "没有需要": "表示不需要", "不考虑": "表示不考虑", "没有购车计划": "表示没有购车计划",
    "没有买车的打算": "表示没有购车计划",
}
INTERESTED = {
    "价格": "询问了价格", "多少钱": "询问了价格", "报价": "希望得到报价", "落地价": "询问了价格",
    "试驾": "希望预约试驾", "优惠": "关注购车优惠", "感兴趣": "表示感兴趣", "有兴趣": "表示感兴趣",
    "明天下午": "约定明天下午再联系", "到店": "愿意到店看车", "想了解": "希望进一步了解",
}
INJECTION_MARKERS = ("忽略", "指令", "标记为", "系统提示", "提示词", "你现在是", "ignore", "instruction",
                     "system prompt", "disregard")
_TRIGGER_RE = re.compile(r"\[\[llm:([a-z_]+)\]\]")
_ROBOT_SPEAKERS = {"robot", "机器人", "bot", "assistant", "ivr", "agent", "坐席", "客服", "ai", "system"}
_CONTACT_LINE_RE = re.compile(r"^\s*(?:客户|用户|联系人|contact|customer|user)\s*[:：]\s*(.*)$",
                              re.IGNORECASE | re.MULTILINE)
_ANY_SPEAKER_LINE_RE = re.compile(r"^\s*(?:机器人|robot|客服|坐席)\s*[:：]", re.IGNORECASE | re.MULTILINE)
_TRANSCRIPT_RE = re.compile(r"<(?:transcript|conversation)>(.*?)</(?:transcript|conversation)>", re.DOTALL)
_NOW_RE = re.compile(
    r"(?:当前时间|现在时间|当前日期时间|当前日期|现在是|current\s+time|\bnow\b)\D{0,20}?"
    r"(\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}(?::\d{2})?)", re.IGNORECASE)


def content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal form: [{"text": ...}, ...]
        return "\n".join(str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in content)
    return "" if content is None else json.dumps(content, ensure_ascii=False)


def _split_messages(messages: str | Iterable[Mapping[str, Any]]) -> tuple[str, str]:
    """(all text, user-side text) of a request's messages or prompt."""
    if isinstance(messages, str):
        return messages, messages
    all_parts, user_parts = [], []
    for m in messages:
        text = content_text(m.get("content"))
        all_parts.append(text)
        if m.get("role", "user") not in ("system", "assistant"):
            user_parts.append(text)
    return "\n".join(all_parts), "\n".join(user_parts)


def _speaker_entry(item: Any) -> tuple[str, str] | None:
    if not isinstance(item, dict):
        return None
    low = {str(k).lower(): v for k, v in item.items()}
    speaker = low.get("speaker", low.get("role"))
    script = low.get("script", low.get("content", low.get("text")))
    if speaker is None or script is None:
        return None
    return str(speaker), str(script)


def _conversation_arrays(text: str) -> list[list[tuple[str, str]]]:
    decoder = json.JSONDecoder()
    found = []
    i = text.find("[")
    while i != -1:
        try:
            value, end = decoder.raw_decode(text, i)
        except ValueError:
            value, end = None, i + 1
        entries = [_speaker_entry(x) for x in value] if isinstance(value, list) and value else []
        if entries and all(e is not None for e in entries):
            found.append(entries)
            i = text.find("[", end)
        else:
            i = text.find("[", i + 1)
    return found


def customer_lines(user_text: str) -> list[str]:
    """What the customer said, found as described in the module docstring."""
    blocks = _TRANSCRIPT_RE.findall(user_text)
    if blocks:
        user_text = "\n".join(blocks)
    arrays = _conversation_arrays(user_text)
    if not arrays and '\\"' in user_text:  # a conversation JSON embedded as a JSON string
        arrays = _conversation_arrays(user_text.replace('\\"', '"'))
    if arrays:
        return [script for arr in arrays for speaker, script in arr
                if speaker.strip().lower() not in _ROBOT_SPEAKERS]
    prefixed = _CONTACT_LINE_RE.findall(user_text)
    if prefixed or _ANY_SPEAKER_LINE_RE.search(user_text):
        return prefixed
    return user_text.splitlines()  # per line, so that an injected line drops alone


def current_time(all_text: str, now: datetime | None = None) -> datetime:
    m = _NOW_RE.search(all_text)
    if m:
        raw = m.group(1).replace("T", " ")
        for fmt in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M"):
            try:
                return datetime.strptime(raw, fmt)
            except ValueError:
                continue
    return (now or datetime.now(SHANGHAI)).replace(tzinfo=None, microsecond=0)


def analyze(messages: str | Iterable[Mapping[str, Any]], *, now: datetime | None = None) -> dict:
    """The stand-in's honest verdict dict (no trigger handling)."""
    all_text, user_text = _split_messages(list(messages) if not isinstance(messages, str) else messages)
    lines = customer_lines(user_text)
    injected = [ln for ln in lines if any(k in ln.lower() for k in INJECTION_MARKERS)]
    spoken = " ".join(ln for ln in lines if ln not in injected)
    spoken = _TRIGGER_RE.sub("", spoken)
    note = "（客户话语中含有试图改变判定的指令性内容，已忽略。）" if injected else ""

    negatives = _reasons(spoken, NOT_INTERESTED)
    positives = _reasons(spoken, INTERESTED)
    if negatives:
        return {"leads_remark": f"客户{'，'.join(negatives)}，暂无购车意向。{note}",
                "is_interested": 2, "next_follow_time": None}
    if positives:
        follow = (current_time(all_text, now) + timedelta(days=1)).replace(hour=14, minute=0, second=0)
        when = follow.strftime("%Y-%m-%d %H:%M:%S")
        return {"leads_remark": f"客户{'，'.join(positives)}，有购车意向，建议销售顾问于{when}跟进。{note}",
                "is_interested": 1, "next_follow_time": when}
    if not spoken.strip(" 。，？！…喂?"):
        return {"leads_remark": f"通话中客户未有效回应，无法判断意向。{note}", "is_interested": 0,
                "next_follow_time": None}
    return {"leads_remark": f"客户未明确表态，意向不明，建议择期再次联系。{note}", "is_interested": 0,
            "next_follow_time": None}


def _reasons(text: str, table: Mapping[str, str]) -> list[str]:
    out: list[str] = []
    for keyword, reason in table.items():
        if keyword in text and reason not in out:
            out.append(reason)
    return out


def respond(messages: str | Iterable[Mapping[str, Any]], *, now: datetime | None = None) -> str:
    """The assistant message content the stand-in returns (honours the ``[[llm:...]]`` triggers)."""
    messages = messages if isinstance(messages, str) else list(messages)
    all_text, _ = _split_messages(messages)
    verdict = analyze(messages, now=now)
    m = _TRIGGER_RE.search(all_text)
    trigger = m.group(1) if m else None
    if trigger == "garbage":
        return "抱歉，我无法回答"
    if trigger in ("string_one", "date_words", "past_date") and verdict["is_interested"] != 1:
        follow = (current_time(all_text, now) + timedelta(days=1)).replace(hour=14, minute=0, second=0)
        verdict.update(is_interested=1, next_follow_time=follow.strftime("%Y-%m-%d %H:%M:%S"))
    if trigger == "out_of_range":
        verdict["is_interested"] = 5
    elif trigger == "string_one":
        verdict["is_interested"] = "1"
    elif trigger == "date_words":
        verdict["next_follow_time"] = "明天下午"
    elif trigger == "past_date":
        verdict["next_follow_time"] = "2001-01-01 14:00:00"
    elif trigger == "empty_remark":
        verdict["leads_remark"] = ""
    elif trigger == "long_remark":
        verdict["leads_remark"] = ("客户" * 750)[:1500]
    elif trigger == "missing_field":
        verdict = {"leads_remark": verdict["leads_remark"]}
    content = json.dumps(verdict, ensure_ascii=False)
    if trigger == "fenced":
        return f"```json\n{content}\n```"
    return content

"""Tokenizer: a `tokenizers.Tokenizer` plus the model's chat template (rendered with jinja2, sandboxed)."""
from __future__ import annotations

from datetime import datetime

from ..errors import SpecqError


class Tokenizer:
    def __init__(self, tok, chat_template: str | None, bos_id=None, eos_ids=(), add_bos: bool = False,
                 bos_token=None, eos_token=None):
        self.tok = tok
        self.chat_template = chat_template
        self.bos_id = bos_id
        self.eos_ids = list(eos_ids)
        self.add_bos = add_bos  # prepend bos on plain encode when the tokenizer's own post-processor does not
        self.bos_token = bos_token if isinstance(bos_token, str) else (bos_token or {}).get("content") if isinstance(bos_token, dict) else None
        self.eos_token = eos_token if isinstance(eos_token, str) else (eos_token or {}).get("content") if isinstance(eos_token, dict) else None
        if self.bos_token is None and bos_id is not None:
            self.bos_token = tok.id_to_token(bos_id)
        if self.eos_token is None and self.eos_ids:
            self.eos_token = tok.id_to_token(self.eos_ids[0])

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, special: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=special).ids
        if special and self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise SpecqError("this model has no chat template; use plain generation (--no-chat)")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise SpecqError(f"chat template: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except jinja2.TemplateError as e:
            raise SpecqError(f"chat template failed: {e}") from None

    def chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Messages [{"role", "content"}] -> prompt ids with the chat template and generation prompt."""
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise SpecqError("each message needs string 'role' and 'content' fields")
        return self.encode(self.render_chat(messages, add_generation_prompt), special=False)


class StreamDecoder:
    """Turns a growing list of ids into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.ids, self.sent = tok, [], 0

    def push(self, ids) -> str:
        self.ids.extend(ids)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.sent = text[self.sent:], len(text)
        return piece

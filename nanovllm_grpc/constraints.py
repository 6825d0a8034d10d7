"""Structured output's common ground for both services: a constraint as an xgrammar Grammar, and the
compiler for a model's tokenizer. The scheduler compiles a constraint to validate it and to follow
each sequence's tokens; the worker compiles it again to mask the logits where tokens are drawn.
Both build the compiler from the same files (the model directory's tokenizer and its EOS ids), so
their matchers agree on every token."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")
_PLAIN = re.compile(r"[ !#-\[\]-~]+|.", re.S)  # printable ASCII runs but " and \, or any one other character


def load_eos_ids(model_dir: str, tokenizer: object) -> set[int]:
    """The model's end-of-sequence ids: generation_config.json's (else config.json's) and the tokenizer's."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        path = Path(model_dir) / name
        if path.exists():
            eos = json.loads(path.read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
            if ids:
                break
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if tok_eos is not None:
        ids.add(tok_eos)
    return ids


def make_compiler(model_dir: str, vocab_size: int) -> tuple[Any, Any]:
    """(the xgrammar module, a GrammarCompiler for the tokenizer in model_dir); slow (seconds: it
    reads the whole vocabulary), and it imports torch."""
    import xgrammar as xgr
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eos = sorted(load_eos_ids(model_dir, tokenizer))
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=eos)
    return xgr, xgr.GrammarCompiler(info, cache_enabled=False)  # callers keep bounded caches of their own


def message(e: Exception) -> str:
    """xgrammar's error in one line, without the C++ source location it starts with."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return _LOCATION.sub("", first)[:500]


def to_grammar(xgr: Any, kind: str, spec: str | tuple[str, ...]) -> Any:
    """The constraint as an xgrammar Grammar; raises xgrammar's error when it does not parse."""
    # JSON as json.dumps writes it, ", " and ": " between items and no other whitespace: the form
    # models learned, and no room for the runs of blank lines they can fall into under a grammar.
    if kind == "json_schema":
        return xgr.Grammar.from_json_schema(spec, any_whitespace=False)
    if kind == "json_object":
        return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False)
    if kind == "regex":
        return xgr.Grammar.from_regex(spec)
    if kind == "grammar":
        return xgr.Grammar.from_ebnf(spec)
    if kind == "choice":
        return xgr.Grammar.from_ebnf("root ::= " + " | ".join(_literal(s) for s in spec))
    assert isinstance(spec, str), kind
    tag = json.loads(spec)
    if isinstance(tag, dict) and "structures" in tag:  # the older format: tags opened by triggers
        items = [
            xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s.get("schema", {})), end=s["end"])
            for s in tag["structures"]
        ]
        return xgr.Grammar.from_structural_tag(items, tag.get("triggers", []))
    return xgr.Grammar.from_structural_tag(spec)


def _literal(text: str) -> str:
    """text as a sequence of EBNF string literals, each character other than printable ASCII in a
    literal of its own: xgrammar reads an escape's hex digits greedily, and keeps a non-ASCII
    character as one, so "ïc" in one literal would be U+0EFC."""
    return "(" + " ".join(json.dumps(p, ensure_ascii=False) for p in _PLAIN.findall(text)) + ")"

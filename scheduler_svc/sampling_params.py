"""Validated sampling settings of one request, with the defaults a vLLM user expects."""

from __future__ import annotations

from dataclasses import dataclass

from scheduler_svc.errors import InvalidRequest

MAX_LOGPROBS = 20
CONSTRAINT_KINDS = ("json_schema", "regex", "grammar", "structural_tag", "json_object", "choice")


@dataclass(frozen=True)
class Constraint:
    """Structured output: what every generated token must keep possible (compiled by grammar.py).

    `spec` is the schema, regex, EBNF or structural tag text; the choices for "choice"; "" for
    "json_object". Hashable, so that compiled grammars are cached by it."""

    kind: str
    spec: str | tuple[str, ...] = ""

    def __post_init__(self) -> None:
        if self.kind not in CONSTRAINT_KINDS:
            raise InvalidRequest(f"constraint kind must be one of {', '.join(CONSTRAINT_KINDS)}, got {self.kind!r}")
        if self.kind == "choice":
            if not (isinstance(self.spec, tuple) and self.spec and all(self.spec)):
                raise InvalidRequest("sampling.choice needs at least one choice and no empty one")
        elif self.kind != "json_object" and not (isinstance(self.spec, str) and self.spec.strip()):
            raise InvalidRequest(f"sampling.{self.kind} is empty")


MAX_N = 16  # samples of one prompt
MAX_LOGIT_BIAS = 300  # entries of logit_bias, as OpenAI allows
# Below this a temperature samples as greedy, its limit: dividing the logits by it would overflow
# float32 (inf - inf = NaN), and far above that point the draw is already all but certain.
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int = 0
    constraint: Constraint | None = None
    n: int = 1  # samples of the prompt, sharing its KV blocks
    skip_special_tokens: bool = True  # in the text stop strings are matched against
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, limit: str, value: object) -> None:
            if not ok:
                raise InvalidRequest(f"sampling.{name} must be {limit}, got {value!r}")

        check(self.max_tokens >= 1, "max_tokens", ">= 1", self.max_tokens)
        check(0.0 <= self.temperature <= 100.0, "temperature", "in [0, 100]", self.temperature)
        check(0.0 < self.top_p <= 1.0, "top_p", "in (0, 1]", self.top_p)
        check(self.top_k >= -1, "top_k", ">= -1 (0 or -1 disable it)", self.top_k)
        check(0.0 <= self.min_p <= 1.0, "min_p", "in [0, 1]", self.min_p)
        check(0.0 < self.repetition_penalty <= 10.0, "repetition_penalty", "in (0, 10]", self.repetition_penalty)
        check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "in [-2, 2]", self.presence_penalty)
        check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "in [-2, 2]", self.frequency_penalty)
        check(self.min_tokens <= self.max_tokens, "min_tokens", f"<= max_tokens ({self.max_tokens})", self.min_tokens)
        check(0 <= self.logprobs <= MAX_LOGPROBS, "logprobs", f"in [0, {MAX_LOGPROBS}]", self.logprobs)
        check(1 <= self.n <= MAX_N, "n", f"in [1, {MAX_N}]", self.n)
        check(len(self.logit_bias) <= MAX_LOGIT_BIAS, "logit_bias", f"at most {MAX_LOGIT_BIAS} entries", "more")
        bad = [b for _, b in self.logit_bias if not -100.0 <= b <= 100.0]
        check(not bad, "logit_bias", "values in [-100, 100]", bad[:1])
        check(all(s for s in self.stop), "stop", "non-empty strings", list(self.stop))
        check(len(self.stop) <= 16, "stop", "at most 16 strings", len(self.stop))
        check(all(len(s) <= 256 for s in self.stop), "stop", "strings of at most 256 characters", "longer")
        # The grammar may allow nothing but EOS when min_tokens would still ban it.
        check(self.constraint is None or not self.min_tokens, "min_tokens", "0 with a constraint", self.min_tokens)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

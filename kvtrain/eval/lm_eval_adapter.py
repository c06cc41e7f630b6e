"""lm-evaluation-harness model type ``kvtrain``: any lm-eval task under a compressed KV cache.

Importing this module registers the model type. lm-eval 0.4.13 discovers third-party model types only when
their module has been imported, so run it through kvtrain, which imports this first and then hands the
command line to lm-eval unchanged::

    kvtrain eval lm-eval run --model kvtrain --model_args pretrained=smollm2-135m,kv_config=c.yaml --tasks ...

or from Python: ``import kvtrain.eval.lm_eval_adapter`` then ``lm_eval.simple_evaluate(model="kvtrain", ...)``.

Model arguments: ``pretrained`` (embedded name, path, Hub id, or a kvtrain checkpoint folder, evaluated under
its own `kv_compression/` unless ``kv_config`` is given), ``kv_config`` (a `KVCompressionConfig` file; absent
or ``none``: the full cache), ``loglikelihood`` (``replay``: one teacher-forced forward reproducing the cache's
keep-sets, or ``cache``: step-by-step decoding through a `CompressedCache`; equal by the parity tests),
``max_length``. Generation (`generate_until`) runs `model.generate` with a fresh `CompressedCache` per request,
greedy. Requests run one at a time, each with its own cache, so compression never mixes requests.
"""

from __future__ import annotations

import logging
import sys

import lm_eval.models  # noqa: F401  (registers lm-eval's own model types before ours joins them)
import torch
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm
from transformers import StoppingCriteria

from kvtrain.config import ConfigError, KVCompressionConfig
from kvtrain.eval.items import cut_at_stop
from kvtrain.eval.loading import load_for_eval
from kvtrain.runtime.cache import CompressedCache
from kvtrain.runtime.decode import teacher_forced_decode
from kvtrain.runtime.replay import replay_compression

LOGLIKELIHOOD_METHODS = ("replay", "cache")
logger = logging.getLogger("kvtrain")


@register_model("kvtrain")
class KVTrainLM(TemplateLM):
    def __init__(self, pretrained: str = "smollm2-135m", kv_config: str | None = None, loglikelihood: str = "replay",
                 max_length: int | None = None, max_gen_toks: int = 256, batch_size: int | str | None = None,
                 max_batch_size: int | None = None, device: str | None = None, **unknown) -> None:

        super().__init__()
        if unknown:
            raise ConfigError(f"lm-eval model_args {sorted(unknown)}: not arguments of the kvtrain model type "
                              "(pretrained, kv_config, loglikelihood, max_length, max_gen_toks)")
        if loglikelihood not in LOGLIKELIHOOD_METHODS:
            raise ConfigError(f"lm-eval model_args loglikelihood={loglikelihood!r}: choose one of {LOGLIKELIHOOD_METHODS}")
        if device not in (None, "cpu") and not str(device).startswith("cuda"):
            raise ConfigError(f"lm-eval device={device!r}: expected cpu or cuda[:n]")
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            logger.warning("lm-eval device=%s, but CUDA is not available: running on the CPU", device)
            device = "cpu"
        self.model, self.tokenizer, trained = load_for_eval(str(pretrained))
        self.model.to(device or "cpu")
        if kv_config is not None and str(kv_config).lower() != "none":
            self.kv_config = KVCompressionConfig.load(kv_config)
        else:
            self.kv_config = trained if kv_config is None else None
        self.loglikelihood_method = loglikelihood
        self._max_length = int(max_length or getattr(self.model.config, "max_position_embeddings", 2048))
        self.max_gen_toks = int(max_gen_toks)
        self._device = self.model.device

    # ------------------------------------------------------------------ what TemplateLM needs
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def continuation_logprobs(self, context: list[int], continuation: list[int]) -> torch.Tensor:
        """Log-probabilities [len(continuation), vocab] of each continuation position, under the compression:
        the context is the prefill (compressed), the continuation is decoded through the cache's schedule."""

        ids = torch.tensor([context + continuation], device=self.model.device)
        if self.kv_config is None:
            logits = self.model(input_ids=ids).logits
        elif self.loglikelihood_method == "replay":
            with replay_compression(self.model, self.kv_config, prefill_len=len(context)):
                logits = self.model(input_ids=ids, use_cache=False).logits
        else:
            cache = CompressedCache.for_model(self.model, self.kv_config)
            logits = teacher_forced_decode(self.model, cache, ids, prefill_len=len(context))
        return torch.log_softmax(logits[0, len(context) - 1 : -1].float(), dim=-1)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = []
        for request, context, continuation in tqdm(requests, desc="kvtrain loglikelihood", disable=disable_tqdm):
            keep = self.max_length - len(continuation)
            if keep < 1:
                raise ValueError(f"a continuation of {len(continuation)} tokens does not fit max_length={self.max_length}")
            context = context[-keep:]  # drop the oldest context tokens, as lm-eval's HF model does
            logprobs = self.continuation_logprobs(context, continuation)
            target = torch.tensor(continuation, device=logprobs.device)
            total = float(logprobs.gather(-1, target[:, None]).sum())
            greedy = bool((logprobs.argmax(-1) == target).all())
            results.append((total, greedy))
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, (total, greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for (text,) in tqdm([r.args for r in requests], desc="kvtrain rolling", disable=disable_tqdm):
            windows = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            total = sum(score for score, _ in self._loglikelihood_tokens([(None, c, t) for c, t in windows],
                                                                          disable_tqdm=True))
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return results

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:

        outputs = []
        for context, gen_kwargs in tqdm([r.args for r in requests], desc="kvtrain generate", disable=disable_tqdm):
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            if kwargs.pop("do_sample", False) or kwargs.pop("temperature", 0.0):
                raise ValueError("the kvtrain model type decodes greedily: set do_sample false and temperature 0")
            if kwargs:
                raise ValueError(f"generation arguments {sorted(kwargs)} are not supported by the kvtrain model type")
            ids = self.tok_encode(context)[-(self.max_length - max_new):]
            input_ids = torch.tensor([ids], device=self.model.device)
            cache = None if self.kv_config is None else CompressedCache.for_model(self.model, self.kv_config)
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      past_key_values=cache, max_new_tokens=max_new, do_sample=False,
                                      stopping_criteria=[_StopStrings(self.tokenizer, len(ids), until)],
                                      pad_token_id=self.tokenizer.pad_token_id)
            text = cut_at_stop(self.tok_decode(out[0, len(ids):].tolist()), until)
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return outputs


class _StopStrings(StoppingCriteria):
    """Stop once the decoded answer contains one of `stops` (transformers' own stop strings need a byte-level
    tokenizer; this works with any)."""

    def __init__(self, tokenizer, prompt_len: int, stops: list[str]):
        self.tokenizer, self.prompt_len, self.stops = tokenizer, prompt_len, stops

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


def run_lm_eval_cli(argv: list[str]) -> None:
    """lm-eval's own command line, with the kvtrain model type registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *argv]
    cli_evaluate()

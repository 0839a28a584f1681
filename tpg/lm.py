"""A tiny GPT-2 behind the policy protocol: the same estimators, exact engine and sampler as tabular.

``GPT2Policy`` wraps ``transformers.GPT2LMHeadModel`` built from a ``GPT2Config`` with a seeded
random init (nothing is ever downloaded: no ``from_pretrained``, no hub access, so it works
offline and under HF_HUB_OFFLINE=1). Its vocabulary is
the token MDP's V tokens plus one start marker BOS = V. A prompt x with response prefix y_<t is
the input sequence

    [BOS] ⊕ x ⊕ y_<t        (positions 0, 1, …; BOS marks the start even for an empty prompt)

and π(· | x, y_<t) is the softmax of the LM head's logits restricted to the V real tokens (BOS is
never an action), so π is a distribution over exactly the MDP's vocabulary (PAPER §1.1).

Prompts of different lengths are LEFT-padded (pad id = BOS) with an attention mask, and position
ids count real tokens only, so a padded row computes the same numbers as the unpadded one (pads get
attention weight exp(−huge) = 0 exactly). When every row has the same context length no mask is
passed at all. The decoder does the same for prefixes of different lengths, then decodes
incrementally with the KV cache (``kv_cache=False`` recomputes the whole sequence at every step:
the reference the cache is tested and benchmarked against).

float64 (the default) is the exact path; float32 is for Monte Carlo only (DESIGN §4).
"""
from __future__ import annotations

import torch
from torch import nn

from tpg import validate
from tpg.mdp import BudgetError, TokenMDP, TPGError
from tpg.policies import Policy, register_policy

ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
PARAM_BUDGET = 50_000_000      # GPT-2 parameters (400 MB in float64) before refusing: this is a tiny model


def _model_cache(out):
    """The KV cache of a model output (``cache`` in transformers ≥ 5, ``past_key_values`` before)."""
    c = getattr(out, "cache", None)
    return c if c is not None else out.past_key_values


class GPT2Policy(Policy):
    """π_θ(a | x, y_<t) = softmax over the V MDP tokens of a tiny GPT-2's next-token logits.

    Args:
      mdp: the token MDP (its prompts, vocabulary and horizon fix the model's sizes).
      seed: seeds the random init (inside ``torch.random.fork_rng``: the global RNG is untouched).
      n_layer, n_head, n_embd: transformer sizes (n_embd divisible by n_head).
      dtype: torch.float64 on the exact path; torch.float32 allowed for Monte Carlo.
      init_range: std of the normal init (HF's ``initializer_range``; larger = less uniform π).
      attn: "eager" (default: also supports forward-mode AD, which ``tpg.mc`` uses) or "sdpa".
      activation: GPT-2's "gelu_new" (tanh approximation) or e.g. "gelu" (exact erf; one fused op,
        about twice as fast on CPU, used by the Monte Carlo tests).
      kv_cache: False makes the decoder recompute the full sequence at every step (reference).
    """

    def __init__(self, mdp: TokenMDP, seed: int = 0, *, n_layer: int = 2, n_head: int = 2, n_embd: int = 32,
                 dtype: torch.dtype = torch.float64, init_range: float = 0.02, attn: str = "eager",
                 activation: str = "gelu_new", kv_cache: bool = True):
        super().__init__()
        validate.mdp("mdp", mdp)
        validate.seed("seed", seed)
        for name, v in (("n_layer", n_layer), ("n_head", n_head), ("n_embd", n_embd)):
            validate.integer(name, v, 1)
        if n_embd % n_head:
            raise TPGError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
        validate.choice("dtype", dtype, (torch.float64, torch.float32),
                        " (float64 on the exact path, float32 for Monte Carlo)")
        validate.choice("attn", attn, ATTN_IMPLEMENTATIONS)
        validate.real("init_range", init_range, 0.0, None, "(]", why=" (the std of the random init)")
        validate.boolean("kv_cache", kv_cache)
        ctx = max(len(p) for p in mdp.prompts) + 1                       # longest [BOS] ⊕ x
        n_params = 12 * n_layer * n_embd**2 + (mdp.vocab_size + 1 + ctx + mdp.horizon + 1) * n_embd
        if n_params > PARAM_BUDGET:
            raise BudgetError(f"a GPT-2 with n_layer={n_layer}, n_embd={n_embd} for V={mdp.vocab_size} has about "
                              f"{n_params:,} parameters, above the budget of {PARAM_BUDGET:,}; tpg's GPT-2 is a "
                              "tiny model: use fewer layers or a smaller n_embd")
        try:
            from transformers import GPT2Config, GPT2LMHeadModel
            from transformers.activations import ACT2FN
        except ImportError as e:
            raise TPGError(f"the gpt2 policy needs transformers ({e}); install with: pip install -e '.[lm]'") from e
        if not (isinstance(activation, str) and activation in ACT2FN):
            raise TPGError(f"unknown activation {activation!r}; e.g. 'gelu_new' (GPT-2's) or 'gelu'")
        self.mdp, self.kv_cache = mdp, bool(kv_cache)
        V = mdp.vocab_size
        self.bos = V
        cfg = GPT2Config(vocab_size=V + 1, n_positions=ctx + mdp.horizon + 1, n_embd=n_embd, n_layer=n_layer,
                         n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         initializer_range=init_range, bos_token_id=V, eos_token_id=None, pad_token_id=None,
                         activation_function=activation, attn_implementation=attn)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = GPT2LMHeadModel(cfg)
        self.model = model.to(dtype).eval()                              # eval: no dropout anywhere
        # Left-padded contexts [pad…, BOS, x] (P, ctx) and their real-token masks.
        ids = torch.full((len(mdp.prompts), ctx), V, dtype=torch.long)
        real = torch.zeros(len(mdp.prompts), ctx, dtype=torch.bool)
        for i, p in enumerate(mdp.prompts):
            if p:
                ids[i, ctx - len(p):] = torch.tensor(p)
            real[i, ctx - len(p) - 1:] = True
        self.register_buffer("ctx_ids", ids, persistent=False)
        self.register_buffer("ctx_real", real, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.transformer.wte.weight.dtype

    # ------------------------------------------------------------------ the math
    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits over the V real tokens only (BOS's row of the tied LM head is not an action)."""
        return nn.functional.linear(h, self.model.lm_head.weight[: self.vocab_size])   # (..., V)

    def _hidden(self, ids: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
        """Hidden states (B, T, E) of (B, T) ids; ``real`` (B, T) marks real tokens (None: all real).
        Position ids count real tokens only, so a left-padded row matches its unpadded self."""
        if real is None:
            return self.model.transformer(ids, use_cache=False).last_hidden_state
        pos = (real.long().cumsum(1) - 1).clamp(min=0)                                 # (B, T)
        return self.model.transformer(ids, attention_mask=real.long(), position_ids=pos,
                                      use_cache=False).last_hidden_state

    def _contexts(self, prompt_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, C) left-padded [BOS] ⊕ x trimmed to the batch's longest, and the real mask (None if
        every row is real, so the common equal-length case runs without any mask)."""
        ids, real = self.ctx_ids[prompt_idx], self.ctx_real[prompt_idx]              # (B, ctx)
        C = int(real.sum(1).max())
        ids, real = ids[:, -C:], real[:, -C:]                                         # (B, C)
        return ids, (None if bool(real.all()) else real)

    def logits(self, prompt_idx: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, V) next-token logits over the MDP vocabulary, row t conditioning on tokens[:, :t].

        One teacher-forced forward over [BOS] ⊕ x ⊕ y_<L; the last response token is never an input.
        """
        prompt_idx, tokens = prompt_idx.long(), tokens.long()
        B, L = tokens.shape
        if L == 0:
            return torch.zeros(B, 0, self.vocab_size, dtype=self.dtype)
        ctx, real = self._contexts(prompt_idx)                                        # (B, C)
        C = ctx.shape[1]
        ids = torch.cat([ctx, tokens[:, : L - 1]], 1)                                 # (B, C + L − 1)
        if real is not None:
            real = torch.cat([real, torch.ones(B, L - 1, dtype=torch.bool)], 1)
        h = self._hidden(ids, real)                                                   # (B, C + L − 1, E)
        return self._head(h[:, C - 1:])                                               # (B, L, V)

    def log_probs(self, prompt_idx: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.logits(prompt_idx, tokens), -1)                # (B, L, V)

    def token_log_probs(self, prompt_idx: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        z = self.logits(prompt_idx, tokens)                                           # (B, L, V)
        return z.gather(-1, tokens.long()[..., None])[..., 0] - torch.logsumexp(z, -1)   # (B, L)

    def decoder(self, prompt_idx: torch.Tensor, prefix: torch.Tensor, prefix_len: torch.Tensor):
        return _GPT2Decoder(self, prompt_idx.long(), prefix.long(), prefix_len.long())


class _GPT2Decoder:
    """Incremental decoding from [BOS] ⊕ x ⊕ prefix[:len] of every row (no autograd: decoding only
    picks tokens; estimators re-score them with ``token_log_probs``).

    Rows of different total lengths are right-aligned (left-padded) with an attention mask and
    per-row position ids; every ``advance`` feeds one token per row with the KV cache (or, with
    ``kv_cache=False``, reruns the whole sequence).
    """

    def __init__(self, policy: GPT2Policy, prompt_idx, prefix, prefix_len):
        self.policy = policy
        B, L0 = prefix.shape
        ids = torch.cat([policy.ctx_ids[prompt_idx], prefix], 1)                     # (B, ctx + L0)
        real = torch.cat([policy.ctx_real[prompt_idx],
                          torch.arange(L0)[None, :] < prefix_len[:, None]], 1)          # (B, ctx + L0)
        order = torch.argsort(real.int(), dim=1, stable=True)                         # pads first, order kept
        ids, real = ids.gather(1, order), real.gather(1, order)                       # right-aligned rows
        T0 = int(real.sum(1).max())
        self.ids, self.real = ids[:, -T0:], real[:, -T0:]                            # (B, T0)
        self.padded = not bool(self.real.all())
        self.max_pos = policy.model.config.n_positions - 1
        with torch.no_grad():
            h, self.cache = self._run(self.ids, None)
            self._lp = torch.log_softmax(policy._head(h[:, -1]), -1)                 # (B, V)

    def _run(self, ids: torch.Tensor, cache):
        """Hidden states of ``ids`` (B, T) given the cache of everything before them (or None: the
        full sequence). Returns (hidden (B, T, E), new cache or None without ``kv_cache``)."""
        use_cache = self.policy.kv_cache
        real = self.real.long() if self.padded else None                            # (B, T_total)
        # Positions count real tokens. decode() keeps advancing rows that already finished (their
        # outputs are ignored), which can run past the position table: clamp those.
        pos = (self.real.long().cumsum(1) - 1).clamp(0, self.max_pos)[:, -ids.shape[1]:]   # (B, T)
        out = self.policy.model.transformer(ids, cache, attention_mask=real, position_ids=pos, use_cache=use_cache)
        return out.last_hidden_state, (_model_cache(out) if use_cache else None)

    @property
    def log_probs(self) -> torch.Tensor:
        return self._lp                                                               # (B, V)

    def advance(self, tokens: torch.Tensor) -> None:
        tokens = tokens.long()
        self.ids = torch.cat([self.ids, tokens[:, None]], 1)                          # (B, T + 1)
        self.real = torch.cat([self.real, torch.ones(len(tokens), 1, dtype=torch.bool)], 1)
        with torch.no_grad():
            if self.policy.kv_cache:
                h, self.cache = self._run(tokens[:, None], self.cache)                # one new token per row
            else:
                h, _ = self._run(self.ids, None)                                      # the whole sequence again
            self._lp = torch.log_softmax(self.policy._head(h[:, -1]), -1)            # (B, V)


register_policy("gpt2", GPT2Policy)

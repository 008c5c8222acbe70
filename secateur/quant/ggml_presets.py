"""llama.cpp's quantization presets (`llama-quantize ... Q4_K_M`): which ggml type each tensor gets.

A port of `llama_tensor_get_type` (src/llama-quant.cpp, llama.cpp as vendored by
llama-cpp-python 0.3.36) for the presets secateur writes, dense non-MoE, non-Falcon decoders:
the default type of the preset; the output matrix (or the tied embedding) in Q6_K; per-preset
bumps of attn_v, ffn_down and attn_output by layer (`use_more_bits`; Q3_K_M: the first two
attn_v and the first sixteenth of ffn_down in Q5_K, the rest of both and attn_output in Q4_K;
Q3_K_L: all three in Q5_K; IQ4_NL/IQ4_XS: attn_v in Q5_K where 4 or more query heads share a
KV head, the first eighth of ffn_down in Q5_K without an imatrix); Q4_0/Q5_0 with an imatrix
guarding the first eighth of ffn_down with Q4_1/Q5_1; then llama.cpp's fallbacks for rows that
do not split into 256-weight super-blocks (Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K ->
Q8_0, IQ4_XS -> IQ4_NL). A test compares this table with what llama.cpp's own quantizer writes
for the same model, so "q4_k_m" means here what it means there.
"""

from __future__ import annotations

from dataclasses import dataclass

from secateur.errors import SecateurError
from secateur.quant.ggml import TYPES

# preset -> (llama_ftype number, default ggml type)
PRESETS: dict[str, tuple[int, str]] = {
    "q8_0": (7, "Q8_0"), "q6_k": (18, "Q6_K"), "q5_k_m": (17, "Q5_K"), "q5_k_s": (16, "Q5_K"),
    "q5_1": (9, "Q5_1"), "q5_0": (8, "Q5_0"), "q4_k_m": (15, "Q4_K"), "q4_k_s": (14, "Q4_K"),
    "q4_1": (3, "Q4_1"), "q4_0": (2, "Q4_0"), "iq4_xs": (30, "IQ4_XS"),
    "iq4_nl": (25, "IQ4_NL"), "q3_k_l": (13, "Q3_K"), "q3_k_m": (12, "Q3_K"),
    "q3_k_s": (11, "Q3_K"),
}
# llama.cpp presets secateur does not round to (their types have no secateur rounding), for
# llama.cpp's own ladder below Q3_K_S; preset -> llama_ftype number
LADDER_ONLY: dict[str, int] = {"q2_k": 10, "q2_k_s": 21, "iq3_xxs": 23, "iq3_s": 26,
                               "iq3_m": 27, "iq2_m": 29}
# llama.cpp refuses these without an importance matrix (llama-quant.cpp)
NEEDS_IMATRIX = ("q2_k_s", "iq2_m")
FALLBACK = {"Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL"}
ROLES = ("token_embd", "output", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
         "ffn_up", "ffn_down")


@dataclass(frozen=True)
class TensorSlot:
    """One matrix of the file in llama.cpp's order: its GGUF name, role and row length."""

    name: str
    role: str
    ncols: int


def check_preset(preset: str) -> str:
    key = preset.lower()
    if key not in PRESETS:
        raise SecateurError(f"unknown llama.cpp preset '{preset}'; secateur writes "
                            f"{', '.join(PRESETS)}")
    return key


def llama_ftype(preset: str) -> int:
    """llama.cpp's file type number for a preset its quantizer takes (secateur's presets and
    the ladder-only ones)."""
    key = preset.lower()
    if key in LADDER_ONLY:
        return LADDER_ONLY[key]
    if key not in PRESETS:
        raise SecateurError(f"unknown llama.cpp preset '{preset}'; llama.cpp's ladder takes "
                            f"{', '.join([*PRESETS, *LADDER_ONLY])}")
    return PRESETS[key][0]


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _fallback(t: str, ncols: int) -> str:
    if ncols % TYPES[t].block == 0:
        return t
    t = FALLBACK.get(t, t)
    return t if ncols % TYPES[t].block == 0 else "F16"


def tensor_types(preset: str, slots: list[TensorSlot], n_layers: int, has_imatrix: bool,
                 n_gqa: int = 1) -> dict[str, str]:
    """The ggml type of every matrix (names of `slots`) under llama.cpp's preset; `n_gqa`:
    query heads per KV head in the first layer (llama.cpp's hparams.n_gqa())."""
    key = check_preset(preset)
    default = PRESETS[key][1]
    tied = not any(s.role == "output" for s in slots)
    n_attention_wv = sum(s.role == "attn_v" for s in slots)
    i_attention_wv = i_ffn_down = 0
    out: dict[str, str] = {}
    for s in slots:
        if s.role not in ROLES:
            raise SecateurError(f"{s.name}: no llama.cpp role '{s.role}'")
        t = default
        if s.role == "output" or (tied and s.role == "token_embd"):
            if s.ncols % TYPES[t].block:
                t = "Q8_0"
            elif t != "Q8_0":
                t = "Q6_K"
        elif s.role == "attn_v":
            if key == "q3_k_m":
                t = "Q5_K" if i_attention_wv < 2 else "Q4_K"
            elif key == "q3_k_l" or (key in ("iq4_nl", "iq4_xs") and n_gqa >= 4):
                t = "Q5_K"
            elif key in ("q4_k_m", "q5_k_m") and use_more_bits(i_attention_wv, n_attention_wv):
                t = "Q6_K"
            elif key == "q4_k_s" and i_attention_wv < 4:
                t = "Q5_K"
            i_attention_wv += 1
        elif s.role == "ffn_down":
            i = i_ffn_down
            if key == "q3_k_m":
                t = "Q5_K" if i < n_layers // 16 else "Q4_K"
            elif key == "q3_k_l":
                t = "Q5_K"
            elif key in ("q4_k_m", "q5_k_m") and use_more_bits(i, n_layers):
                t = "Q6_K"
            elif i < n_layers // 8 and (key == "q4_k_s" or (
                    key in ("iq4_nl", "iq4_xs") and not has_imatrix)):
                t = "Q5_K"
            elif key in ("q4_0", "q5_0") and has_imatrix and i < n_layers // 8:
                t = "Q4_1" if key == "q4_0" else "Q5_1"
            i_ffn_down += 1
        elif s.role == "attn_output":
            t = {"q3_k_m": "Q4_K", "q3_k_l": "Q5_K"}.get(key, t)
        out[s.name] = _fallback(t, s.ncols)
    return out

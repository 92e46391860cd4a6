"""How a baseline stores a dense tensor at a base precision, and the exact bits it takes.

Every baseline stores its dense, model-sized tensors (the pre-trained base, TALL's multi-task vector,
EMR's unified vector, Twin's shared expert and low-rank factors) with the delta codecs' base codec
(`mergetool.merge.codecs.encode_base`): fp32 or fp16 casts, or per-row symmetric int8 (0-D/1-D tensors kept
in their own dtype). The model then runs on the decoded values, so a baseline's accuracy and its C always
describe the same stored bytes. Bits are 8 × the tensor-data bytes the codec writes (`tensor_bytes`).
"""

from __future__ import annotations

from torch import Tensor

from mergetool.merge.codecs import BASE_STORAGES, decode_base, encode_base, tensor_bytes, to_tensors

STORAGES = BASE_STORAGES  # fp32 | fp16 | int8


def stored(x: Tensor, storage: str) -> tuple[Tensor, int]:
    """(x as stored and decoded, in x's dtype; its stored bits). fp32 of a float32 tensor is x itself."""
    enc = encode_base(x, storage)
    return decode_base(enc).to(x.dtype), 8 * tensor_bytes(to_tensors(enc, "x"))


def stored_state(state: dict[str, Tensor], storage: str) -> tuple[dict[str, Tensor], int]:
    """Every tensor of a state stored at `storage`: (decoded state, total bits)."""
    out, bits = {}, 0
    for n, x in state.items():
        out[n], b = stored(x, storage)
        bits += b
    return out, bits

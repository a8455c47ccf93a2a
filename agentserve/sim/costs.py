"""What an engine step costs in the simulator: a linear model over what the step computes.

    step seconds = fixed + per prefill token x prefill tokens + per prefill pair x attention pairs
                   + per decoding sequence x sequences + per KV token read x KV tokens the decodes read

The five terms are what a continuous-batching step spends: launch and scheduling overhead (and, on
a GPU, streaming the weights once), the prefill's matmuls (linear in tokens), the prefill's
attention (each new token against the context before it and the chunk up to it: quadratic in a
chunk, linear in the cached prefix it extends), each decoding sequence's per-token work, and decode
attention (memory-bound: every cached token of every decoding sequence is read). The trade-off: no
overlap of compute with memory traffic (the terms add, where a roofline would take their maximum:
conservative for mixed steps), and no interference beyond that.

Three sources of numbers, all `CostModel`s:
- fitted on this machine's engine steps (bench/fit_costs.py writes profiles/NAME.json);
- `roofline(shape, device, tp)`: from a model's shape and a device's FLOP/s and bandwidth, with
  efficiency factors, for any model and device without a measurement;
- named profiles over those (`PROFILES`), chosen with `agentserve sim --profile`.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from agentserve.step_shape import prefill_pairs

PROFILE_DIR = Path(__file__).parent / "profiles"


class CostModel(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    step_s: float  # fixed cost of a step that runs anything
    prefill_token_s: float
    decode_seq_s: float
    kv_read_token_s: float  # per cached token a decoding sequence attends to
    prefill_pair_s: float = 0.0  # per (new token, token it attends to) pair of a prefill
    host_load_token_s: float = 0.0  # a token's KV copied back from the host tier
    # A call's time outside the engine (HTTP, chat template, tokenizing, the program layer, IPC,
    # streaming back): the `front_end` of a real engine's turn split, spent before the request reaches it.
    call_s: float = 0.0
    source: str = ""  # where the numbers come from

    def scaled(self, factor: float) -> "CostModel":
        """Every time term x `factor`: the same engine on a machine `factor` times slower."""
        if factor <= 0:
            raise ValueError(f"a cost scale must be > 0, not {factor}")
        times = {f: getattr(self, f) * factor for f in self.__struct_fields__ if f.endswith("_s")}
        return msgspec.structs.replace(self, **times, name=f"{self.name}x{factor:g}" if factor != 1 else self.name)

    def step(self, prefill_tokens: int, decode_seqs: int, decode_kv_tokens: int, loaded_tokens: int = 0,
             prefill_pairs: int = 0) -> float:
        if prefill_tokens == 0 and decode_seqs == 0:
            return self.host_load_token_s * loaded_tokens
        return (self.step_s + self.prefill_token_s * prefill_tokens + self.prefill_pair_s * prefill_pairs
                + self.decode_seq_s * decode_seqs + self.kv_read_token_s * decode_kv_tokens
                + self.host_load_token_s * loaded_tokens)

    def prefill_s(self, tokens: int) -> float:
        """A re-prefill of `tokens` alone: what the TTL rule weighs a miss at."""
        return self.step(tokens, 0, 0, prefill_pairs=prefill_pairs(0, tokens))

    def load_s(self, tokens: int) -> float:
        """A load-back of `tokens` from the host tier alone (the server profiles this at start-up)."""
        return self.host_load_token_s * tokens


class ModelShape(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    params: float
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    bytes_per_value: int = 2  # bf16

    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.bytes_per_value


class Device(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    flops: float  # dense bf16 FLOP/s
    bandwidth: float  # device memory, bytes/s
    host_bandwidth: float  # host <-> device copies, bytes/s
    # fractions of peak reached in serving, and per-step and per-layer overheads
    prefill_mfu: float = 0.5
    decode_mfu: float = 0.12
    bandwidth_efficiency: float = 0.72
    host_efficiency: float = 0.8
    step_overhead_s: float = 500e-6
    allreduce_s: float = 20e-6  # per all-reduce under tensor parallelism (two per layer)


# Public figures: the models' configs (Hugging Face), NVIDIA's H100 SXM datasheet (989.5 dense bf16
# TFLOP/s, 3.35 TB/s HBM3, PCIe Gen5 x16 64 GB/s); the efficiencies are the H100 calibration of the
# llm-d inference simulator (BLIS) rounded: 0.72 of peak bandwidth, decode MFU 0.12, 0.5 ms a step.
SHAPES = {
    "llama-3.1-8b": ModelShape(name="llama-3.1-8b", params=8.03e9, layers=32, heads=32, kv_heads=8,
                                 head_dim=128),
    "llama-3.1-70b": ModelShape(name="llama-3.1-70b", params=70.6e9, layers=80, heads=64, kv_heads=8,
                                  head_dim=128),
}
DEVICES = {
    "h100": Device(name="h100", flops=989.5e12, bandwidth=3.35e12, host_bandwidth=64e9),
}


def roofline(shape: ModelShape, device: Device, tp: int = 1) -> CostModel:
    """A step's cost from the model's arithmetic and bytes on `tp` devices: the weights are read
    once a step, a prefill token costs 2 x params FLOPs at prefill MFU, a decoding sequence the same
    FLOPs at decode MFU, a prefill attention pair 4 x heads x head_dim FLOPs a layer (scores and
    values) at prefill MFU, a cached token its KV bytes at the effective bandwidth, a loaded-back token
    its KV bytes over the host link. Tensor parallelism divides FLOPs and bytes by `tp` and adds two
    all-reduces per layer to every step."""
    if tp < 1:
        raise ValueError(f"tensor parallelism must be >= 1, not {tp}")
    flops, bandwidth = device.flops * tp, device.bandwidth * device.bandwidth_efficiency * tp
    weights = shape.params * shape.bytes_per_value
    allreduce = 2 * shape.layers * device.allreduce_s if tp > 1 else 0.0
    kv = shape.kv_bytes_per_token()
    return CostModel(
        name=f"roofline:{shape.name}@{device.name}" + (f"x{tp}" if tp > 1 else ""),
        step_s=device.step_overhead_s + allreduce + weights / bandwidth,
        prefill_token_s=2 * shape.params / (flops * device.prefill_mfu),
        decode_seq_s=2 * shape.params / (flops * device.decode_mfu),
        prefill_pair_s=4 * shape.layers * shape.heads * shape.head_dim / (flops * device.prefill_mfu),
        kv_read_token_s=kv / bandwidth,
        host_load_token_s=kv / (device.host_bandwidth * device.host_efficiency * tp),
        source=f"roofline: {shape.name} ({shape.params:.3g} params, {kv} KV bytes/token) on {tp} x {device.name}")


def fitted(name: str) -> CostModel:
    """A profile fitted on a machine by bench/fit_costs.py (profiles/NAME.json)."""
    return msgspec.json.decode((PROFILE_DIR / f"{name}.json").read_bytes(), type=CostModel)


PROFILES = {
    "cpu-bench": lambda: fitted("cpu-bench"),  # this machine, the `bench` model (docs/benchmarks.md)
    "h100-llama8b": lambda: roofline(SHAPES["llama-3.1-8b"], DEVICES["h100"]),
    "h100x4-llama70b": lambda: roofline(SHAPES["llama-3.1-70b"], DEVICES["h100"], tp=4),
}


def load_profile(spec: str) -> CostModel:
    """`--profile`: a name in PROFILES, `roofline:MODEL@DEVICE[xTP]` (MODEL in SHAPES, DEVICE in
    DEVICES), or a profile JSON file (bench/fit_costs.py's output)."""
    if spec in PROFILES:
        return PROFILES[spec]()
    if spec.startswith("roofline:"):
        model, _, device = spec.removeprefix("roofline:").partition("@")
        device, _, tp = device.partition("x")
        if model not in SHAPES or device not in DEVICES or (tp and not tp.isdigit()):
            raise ValueError(f"bad profile {spec!r}: want roofline:MODEL@DEVICE[xTP], MODEL from "
                             f"{', '.join(SHAPES)}, DEVICE from {', '.join(DEVICES)}")
        return roofline(SHAPES[model], DEVICES[device], int(tp or 1))
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"unknown profile {spec!r}: a name from {', '.join(PROFILES)}, "
                         "roofline:MODEL@DEVICE[xTP], or a profile JSON file")
    try:
        return msgspec.json.decode(path.read_bytes(), type=CostModel)
    except msgspec.DecodeError as e:
        raise ValueError(f"profile {path}: {e}") from None

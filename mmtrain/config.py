"""Run configuration: a typed schema, YAML files with base inheritance, `key=value` overrides.

Every run is described by one `Config`. YAML files may name base files (`base: ../base.yaml`,
or a list), merged in order with the file itself last; command-line overrides come after that.
Validation happens here, before any process group starts, so a misspelt key costs seconds,
not a queue wait: unknown keys name the closest valid one, wrong types name the expected
type, missing paths name the path.

The `recipe` section is typed by the recipe it names: each recipe declares a dataclass that
subclasses `RecipeConfig`, so `recipe.lr_scale=...` is checked against that recipe's fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from mmtrain.data.shards import DataError, resolve
from mmtrain.recipes import recipe_class
from mmtrain.schema import (
    ConfigError,
    RecipeConfig,
    bounded,
    choices,
    out_of_range,
)


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"  # the run directory is out_dir/name
    seed: int = 1234
    resume: str = "auto"  # auto: latest checkpoint if any | never | a checkpoint dir
    # end this invocation early (checkpointed), e.g. to split a job
    stop_after_steps: Optional[int] = bounded(None, ge=1)
    # Seconds between the stop signal and the job's end (slurm/train.sbatch: --signal=B:USR1@180).
    # A save that takes more than half of it is logged with the --signal value that would fit it.
    signal_lead_s: int = bounded(180, ge=1)


@dataclass
class TrainConfig:
    # optimizer steps for the whole run (sets the lr schedule)
    steps: int = bounded(
        1000, ge=0, note="0: no training, the initial model is saved and evaluated"
    )
    micro_batch_size: int = bounded(8, ge=1)  # samples per rank per forward
    grad_accum: int = bounded(1, ge=1)
    # samples per optimizer step over all ranks; set, it decides grad_accum at each launch
    # (global / (micro_batch_size x ranks)), so a run resumed on fewer or more GPUs or nodes keeps
    # its global batch; it must divide evenly. null: micro_batch_size x grad_accum x ranks
    global_batch_size: Optional[int] = bounded(None, ge=1)
    lr: float = bounded(1e-4, gt=0)
    min_lr_ratio: float = bounded(0.0, ge=0, le=1)  # cosine decays to lr * min_lr_ratio
    warmup_ratio: float = bounded(0.1, ge=0, lt=1)  # fraction of `steps` spent in linear warm-up
    weight_decay: float = bounded(0.05, ge=0)  # not applied to biases and norm weights
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = bounded(1e-8, gt=0)
    grad_clip: float = bounded(1.0, ge=0)  # 0 disables clipping
    # recompute each transformers layer's forward in the backward pass instead of keeping its
    # activations (non-reentrant): less memory, about a third more compute
    activation_checkpointing: bool = False
    # consecutive non-finite losses or skipped (overflowing) optimizer steps before the run stops
    max_bad_steps: int = bounded(10, ge=1)


@dataclass
class DeepSpeedSection:
    # 0-3, or auto: stage 2 when the model states fit comfortably on each device replicated,
    # else 3 (engine.optim.choose_zero_stage; the decision and its estimate are logged)
    zero_stage: str = "3"
    precision: str = choices("bf16", "fp16", "fp32", default="bf16")
    # AdamW: torch_fused (torch's fused kernel: nothing to compile), fused (DeepSpeed's
    # FusedAdam: JIT-compiled on first use unless DeepSpeed was installed with
    # DS_BUILD_FUSED_ADAM=1), torch (foreach); auto: torch_fused on CUDA, torch on CPU
    optimizer: str = choices("auto", "torch_fused", "fused", "torch", default="auto")
    # The dtype gradients are reduced across ranks in (DeepSpeed's communication_data_type) and
    # accumulated over micro-steps in (data_types.grad_accum_dtype). auto: fp32 for bf16 runs (a
    # bf16 sum over 64 ranks or 16 micro-steps keeps 8 bits of mantissa; the cost: fp32 gradient
    # buffers, 4 bytes per trained parameter held instead of 2, and twice the reduce traffic),
    # except the accumulation at ZeRO stage 0, which DeepSpeed does in the model's dtype only;
    # fp16 runs keep their loss-scaled fp16. engine.optim.reduction_dtypes decides.
    grad_reduce_dtype: str = choices("auto", "fp32", "bf16", "fp16", default="auto")
    grad_accum_dtype: str = choices("auto", "fp32", "bf16", "fp16", default="auto")
    offload_optimizer: bool = False
    offload_params: bool = False
    overlap_comm: bool = True
    # ZeRO buckets and the stage-3 persistence threshold, in elements: a number, or auto (from
    # the widest hidden size among the model's transformers configs, h: reduce h*h, prefetch
    # 0.9*h*h, both at least 2**20; persistence 64*h, at least 1e5; DeepSpeed's 5e8 / 5e7 / 1e5
    # if it holds no transformers model). engine.optim.zero_sizes says why
    reduce_bucket_size: str = "auto"
    prefetch_bucket_size: str = "auto"
    param_persistence_threshold: str = "auto"
    # ZeRO++ hierarchical partitioning (stage 3): a secondary copy of the weights partitioned
    # within groups of this many ranks (the GPUs of a node), so gathers stay inside a node
    hpz_partition_size: int = bounded(1, ge=1)
    # Under ZeRO-3 the large trained models a recipe loads (RunContext.partitioned) are partitioned
    # as they load: no rank ever holds their full weights. false: built whole, partitioned later
    sharded_init: bool = True
    # Raw DeepSpeed config keys, deep-merged over what mmtrain generates (last word).
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DistConfig:
    backend: str = choices("auto", "nccl", "gloo", default="auto")  # auto: nccl on CUDA, else gloo
    # collective timeout while a run starts (model load, partitioning, a resume's conversion, the
    # first step's compilation); a dead peer on gloo fails much sooner
    timeout_s: int = bounded(1800, ge=1)
    # collective timeout once the first step is done: a step, an evaluation batch and a rank's
    # share of a save take seconds to a minute at the published sizes (docs/design.md); 0: keep
    # timeout_s. A late rank is named sooner by the heartbeat (late_after_s)
    step_timeout_s: int = bounded(600, ge=0)
    # how long the other ranks wait for work rank 0 does for all (the universal conversion of a
    # resume on another world size, the consolidation for evaluation, a pipeline's export): in
    # a gloo group of their own, outside the collective timeout above (engine.dist.solo)
    solo_timeout_s: int = bounded(21600, ge=1)
    # the network interface gloo and NCCL connect over (e.g. ib0, eth0, bond0); empty: their own
    # choice. GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME in the environment win over it
    socket_ifname: str = ""
    # each rank posts its progress to the rendezvous store this often (0: no heartbeat); a rank
    # unheard for late_after_s, or a step behind the others that long, is named in the log
    heartbeat_s: float = bounded(10.0, ge=0)
    late_after_s: float = bounded(60.0, gt=0)


@dataclass
class CheckpointConfig:
    every: int = bounded(1000, ge=0)  # steps between checkpoints (0: only at the end)
    # complete checkpoints kept, newest first (the best one is kept too)
    keep: int = bounded(3, ge=1)
    best_metric: str = ""  # an evaluation metric (e.g. ppl): checkpoints/best names the best one
    best_mode: str = choices("min", "max", default="min")


@dataclass
class LogConfig:
    every: int = bounded(10, ge=1)  # steps between scalar logs
    tensorboard: bool = True
    progress: bool = True  # progress bar with ETA on rank 0
    # log lines on the terminal too (rank 0); false: train.log only, warnings still shown
    console: bool = True
    peak_tflops: Optional[float] = None  # per-device peak for MFU; None: looked up by GPU name
    # count the host syncs (.item(), .tolist(), bool/float/int of a tensor) of each optimizer step
    # and log them (engine/syncs.py): the engine's budget is one per step outside log steps
    count_host_syncs: bool = False
    # a torch profiler trace of these optimizer steps, first and last (e.g. [10, 12]), on the
    # ranks of profile_ranks, to RUN_DIR/profile/ (TensorBoard's profiler plugin, or Perfetto)
    profile_steps: List[int] = field(default_factory=list)
    profile_ranks: List[int] = field(default_factory=lambda: [0])
    # where the logged scalars go besides train.log, TensorBoard (log.tensorboard) and
    # RUN_DIR/metrics.jsonl (always): wandb and/or mlflow, each when installed
    backends: List[str] = field(default_factory=list)


@dataclass
class EvalConfig:
    every: int = bounded(0, ge=0)  # steps between evaluations (0: only at the end)
    at_end: bool = True
    # `mmtrain eval`: replica (every rank holds the whole model, in the run's precision), sharded
    # (ZeRO-3 partitions it across the ranks: for a model one device cannot hold), or auto
    # (replica when the weights take at most half of a device, else sharded)
    placement: str = choices("auto", "replica", "sharded", default="auto")


@dataclass
class Config:
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name


# ----------------------------------------------------------------------------- loading


def _read_yaml(path: Path, chain: Sequence[Path] = ()) -> DictConfig:
    """Read one YAML file and its bases (paths relative to the file), bases first."""
    path = path.resolve()
    if not path.is_file():
        where = f" (named as a base by {chain[-1]})" if chain else ""
        raise ConfigError(f"config file not found: {path}{where}")
    if path in chain:
        raise ConfigError(f"config bases form a cycle: {' -> '.join(map(str, [*chain, path]))}")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml's own errors carry line/column
        raise ConfigError(f"cannot parse {path}: {e}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections, got {type(node).__name__}"
        )
    bases = node.pop("base", None)
    if bases is None:
        return node
    if isinstance(bases, str):
        bases = [bases]
    merged = OmegaConf.create()
    for b in bases:
        merged = OmegaConf.merge(merged, _read_yaml(path.parent / str(b), [*chain, path]))
    return OmegaConf.merge(merged, node)


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for o in overrides:
        if "=" not in o or o.startswith("="):
            raise ConfigError(f"override {o!r} is not of the form key=value (e.g. train.lr=3e-4)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {e}") from None


def _schema_for(recipe_name: str) -> DictConfig:
    cls = recipe_class(recipe_name)
    return OmegaConf.structured(Config(recipe=cls.Config()))


def _nearest(node: Any, key: str, parent_path: str = "") -> str:
    if isinstance(node, DictConfig):
        match = difflib.get_close_matches(key, [str(k) for k in node.keys()], n=1, cutoff=0.5)
        if match:
            return f"; did you mean '{parent_path + '.' if parent_path else ''}{match[0]}'?"
        return f"; valid keys here: {', '.join(str(k) for k in node.keys())}"
    return ""


def _merge_checked(schema: DictConfig, update: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(schema, update)
    except ConfigKeyError as e:
        full = str(e.full_key or e.key)
        parent_path, _, leaf = full.rpartition(".")
        parent = OmegaConf.select(schema, parent_path) if parent_path else schema
        raise ConfigError(
            f"{source}: unknown key '{full}'{_nearest(parent, leaf, parent_path)}"
        ) from None
    except ValidationError as e:
        full = str(e.full_key or e.key)
        node = schema
        for part in full.split("."):
            node = node._get_node(part) if isinstance(node, DictConfig) else None
        expected = getattr(node, "_metadata", None)
        expected = (
            getattr(getattr(expected, "ref_type", None), "__name__", None) or "the schema's type"
        )
        raise ConfigError(
            f"{source}: key '{full}' expects {expected}: {e.msg.splitlines()[0]}"
        ) from None


def load_config(
    path: Optional[str | os.PathLike] = None,
    overrides: Sequence[str] = (),
    pending: Sequence[str] = (),
) -> Config:
    """Load, merge and validate a run configuration; raises `ConfigError` naming the problem.
    `pending`: paths a pipeline's earlier stages will write (see `validate`)."""
    file_node = _read_yaml(Path(path)) if path else OmegaConf.create()
    over_node = _parse_overrides(overrides)
    raw = OmegaConf.merge(file_node, over_node)
    recipe_name = OmegaConf.select(raw, "recipe.name", default=RecipeConfig.name)
    schema = _schema_for(str(recipe_name))
    merged = _merge_checked(schema, file_node, f"config {path}" if path else "config")
    merged = _merge_checked(merged, over_node, "command-line override")
    cfg: Config = OmegaConf.to_object(merged)
    validate(cfg, pending)
    return cfg


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(to_yaml(cfg))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- validation


def _walk(obj: Any, prefix: str = ""):
    """Yield (dotted key, dataclass field, value) for every field, depth first."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        yield key, f, value
        if dataclasses.is_dataclass(value):
            yield from _walk(value, key + ".")


def _absolute_paths(obj: Any) -> None:
    """Path and shard fields become absolute, so a saved config works from any directory."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _absolute_paths(value)
        elif (f.metadata.get("path") is not None or f.metadata.get("shards")) and value:
            setattr(obj, f.name, os.path.abspath(str(value)))


def plan_global_batch(train: TrainConfig, world: int) -> int:
    """train.grad_accum for `world` ranks: as configured, or from train.global_batch_size (which
    must be micro_batch_size x grad_accum x world for a whole grad_accum)."""
    if train.global_batch_size is None:
        return train.grad_accum
    per_pass = train.micro_batch_size * world
    accum, rest = divmod(train.global_batch_size, per_pass)
    if rest or not accum:
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} does not split over {world} ranks "
            f"of train.micro_batch_size={train.micro_batch_size}: it must be a multiple of "
            f"{per_pass}; change one of them, or the number of ranks"
        )
    return accum


def check_run_dir(cfg: Config) -> None:
    """The run directory can be made and written: its nearest existing ancestor (or itself) is a
    writable directory. For the commands that train (a run's config loaded for evaluation elsewhere
    need not pass it)."""
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    here = run_dir
    while not here.exists() and here != here.parent:
        here = here.parent
    if not here.is_dir():
        raise ConfigError(
            f"key 'run.out_dir': the run directory {run_dir} cannot be made: {here} is a file"
        )
    if not os.access(here, os.W_OK | os.X_OK):
        raise ConfigError(
            f"key 'run.out_dir': the run directory {run_dir} cannot be written: {here} is "
            f"read-only for this user"
        )


LOG_BACKENDS = ("wandb", "mlflow")


def _check_log(log: LogConfig) -> None:
    steps = list(log.profile_steps)
    if steps and (len(steps) != 2 or not 1 <= steps[0] <= steps[1]):
        raise ConfigError(
            f"key 'log.profile_steps' must be [first, last] optimizer steps with 1 <= first <= "
            f"last (e.g. [10, 12]), got {steps}"
        )
    unknown = [b for b in log.backends if b not in LOG_BACKENDS]
    if unknown:
        raise ConfigError(
            f"key 'log.backends' names {unknown}: known are {list(LOG_BACKENDS)} (TensorBoard "
            f"is log.tensorboard, and metrics.jsonl is always written)"
        )
    import importlib.util

    absent = [b for b in log.backends if importlib.util.find_spec(b) is None]
    if absent:
        raise ConfigError(
            f"key 'log.backends' names {absent}, not installed here: pip install "
            f"{' '.join(absent)}, or leave it out of log.backends"
        )


def validate(cfg: Config, pending: Sequence[str] = ()) -> None:
    """Every rule of the schema; `pending`: absolute paths an earlier pipeline stage will write
    (a path under one of them need not exist yet)."""
    _absolute_paths(cfg)
    for key, f, value in _walk(cfg):
        _check_field(key, f, value, pending)
    _check_deepspeed(cfg.deepspeed)
    _check_log(cfg.log)
    _check_train_and_run(cfg)
    check = getattr(cfg.recipe, "check", None)
    if check is not None:  # a recipe's own cross-field rules
        check()
    _check_shards(cfg)  # reads the manifests: after the cheaper checks


def _check_field(key: str, f, value, pending: Sequence[str]) -> None:
    """The rules a field declares in the schema: choices, required, shards, path, range."""
    allowed = f.metadata.get("choices")
    if allowed and value not in allowed:
        raise ConfigError(f"key '{key}' must be one of {list(allowed)}, got {value!r}")
    if f.metadata.get("required") and value in (None, ""):
        raise ConfigError(f"key '{key}' is required (a path)")
    if f.metadata.get("shards") and value and "{" not in str(value):
        if not Path(str(value)).is_dir():
            raise ConfigError(f"key '{key}': shard directory does not exist: {value}")
    if f.metadata.get("path") and value not in (None, ""):
        where = os.path.abspath(str(value))
        later = any(where.startswith(os.path.abspath(p)) for p in pending)
        if not later and not Path(str(value)).exists():
            raise ConfigError(f"key '{key}': path does not exist: {value}")
    broken = out_of_range(value, f.metadata["range"]) if "range" in f.metadata else None
    if broken:
        note = f" ({f.metadata['note']})" if f.metadata.get("note") else ""
        raise ConfigError(f"key '{key}' must be {broken}{note}, got {value!r}")


def _check_deepspeed(ds: DeepSpeedSection) -> None:
    if str(ds.zero_stage) not in ("0", "1", "2", "3", "auto"):
        raise ConfigError(
            f"key 'deepspeed.zero_stage' must be 0, 1, 2, 3 or auto, got {ds.zero_stage!r}"
        )
    for key in ("reduce_bucket_size", "prefetch_bucket_size", "param_persistence_threshold"):
        value = str(getattr(ds, key))
        if value != "auto" and not value.isdigit():
            raise ConfigError(
                f"key 'deepspeed.{key}' must be auto or a whole number of elements, got {value!r}"
            )
    if ds.hpz_partition_size > 1 and str(ds.zero_stage) not in ("3", "auto"):
        raise ConfigError(
            "key 'deepspeed.hpz_partition_size' (ZeRO++) needs deepspeed.zero_stage=3, got "
            f"{ds.zero_stage!r}"
        )


def _check_train_and_run(cfg: Config) -> None:
    tr = cfg.train
    if tr.global_batch_size is not None and tr.global_batch_size % tr.micro_batch_size:
        raise ConfigError(
            f"key 'train.global_batch_size'={tr.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={tr.micro_batch_size}"
        )
    if len(tr.betas) != 2 or not all(0 <= b < 1 for b in tr.betas):
        raise ConfigError(f"key 'train.betas' must hold two numbers in [0, 1), got {tr.betas}")
    if (
        cfg.run.resume not in ("auto", "never")
        and not Path(cfg.run.resume).is_dir()
        and not (cfg.run_dir / "checkpoints" / cfg.run.resume).is_dir()
    ):
        raise ConfigError(
            f"key 'run.resume': expected 'auto', 'never', a checkpoint directory or a tag in "
            f"{cfg.run_dir / 'checkpoints'}; path does not exist: {cfg.run.resume}"
        )


def _check_shards(cfg: Config) -> None:
    """Every shard set the recipe names has a manifest, samples, and the kind the recipe reads."""
    kind = cfg.recipe.data_kind()
    for key, f, value in _walk(cfg.recipe, "recipe."):
        if not (f.metadata.get("shards") and value):
            continue
        try:
            _, counts, manifest = resolve(value)
        except DataError as e:
            raise ConfigError(f"key '{key}': {e}") from None
        if not sum(counts):
            raise ConfigError(f"key '{key}': {value} holds no samples (its manifest counts 0)")
        if kind and manifest.get("kind") != kind:
            raise ConfigError(
                f"key '{key}': {value} holds {manifest.get('kind')!r} shards, but recipe "
                f"{cfg.recipe.name} reads {kind!r} shards here"
            )


def load_run_config(run_dir: str | os.PathLike) -> Config:
    """The resolved config a run saved in its directory (no overrides, validated again)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not an mmtrain run directory: {path} is missing")
    return load_config(path)


__all__ = [
    "Config",
    "ConfigError",
    "RecipeConfig",
    "load_config",
    "load_run_config",
    "save_config",
    "to_yaml",
]

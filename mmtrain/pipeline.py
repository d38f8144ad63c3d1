"""`mmtrain pipeline PIPELINE.yaml [key=value ...]`: a declared chain of stages in one launch.

```yaml
name: vikdf                       # the stages' runs go to out_dir/name/<stage>
out_dir: runs
set: [deepspeed.precision=bf16]   # overrides for every train stage (optional)
stages:                           # run in this order
  stage1:   {train: ../vikdf/stage1.yaml, export: true, show: [mean_r@1]}
  fusion:   {train: ../vikdf/stage2_fusion.yaml, export: true,
             set: ["recipe.stage1=${stages.stage1.export}"]}
  dialogue: {train: ../vikdf/stage2_dialogue.yaml,
             set: ["recipe.stage1=${stages.stage1.export}", "recipe.init_from=${stages.fusion.export}"]}
  val:      {eval: dialogue, split: val, show: [ppl, bleu1]}
```

On the command line, `name=`, `out_dir=`, `set=[...]` and `stages.NAME.KEY=` change the
pipeline; any other `key=value` is added to every train stage's overrides (after `set`).

A stage is one of `train` (a run config, relative to this file, with `set` overrides; `export:
true` writes its HF/peft export), `eval` (`mmtrain eval` of an earlier train stage: `split`,
`tag` such as best, `set`), or a kind a recipe adds (`mine`, `seesaw`: mmtrain/tools/).
`${stages.NAME.run}` and `${stages.NAME.export}` name an earlier stage's run directory and
export. Every rank runs the whole chain in one process group, so imports and start-up are paid
once. Every train stage's config is validated before the first stage starts. A finished stage
is recorded in out_dir/name/pipeline.json and never run again; a stage stopped by a signal
checkpoints, the pipeline exits 85 (slurm/train.sbatch requeues it), and the next launch
resumes that stage from its checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mmtrain import tools
from mmtrain.config import load_config
from mmtrain.engine import dist
from mmtrain.schema import ConfigError

TOP_KEYS = ("name", "out_dir", "set", "stages")
KINDS = ("train", "eval")  # and the kinds of mmtrain/tools/
COMMON_KEYS = ("set", "show")
KEYS = {"train": ("export",), "eval": ("split", "tag")}


@dataclass
class Stage:
    name: str
    kind: str
    spec: Dict[str, Any]  # the stage's YAML mapping, references resolved
    dir: Path  # out_dir/name/<stage>: the run directory of a train stage
    show: List[str] = field(default_factory=list)  # figures to print when it ends

    @property
    def export(self) -> Path:
        return self.dir / "export"


def is_pipeline(path: str | os.PathLike) -> bool:
    """Whether a YAML file is a pipeline (a top-level `stages:` mapping) rather than a run config."""
    try:
        node = OmegaConf.load(path)
    except (OSError, OmegaConfBaseException):
        return False
    return isinstance(node, DictConfig) and "stages" in node


class Pipeline:
    def __init__(self, path: str | os.PathLike, overrides: Sequence[str] = ()):
        self.path = Path(path).resolve()
        raw = _load(self.path, overrides)
        self.name = str(raw.get("name") or self.path.stem)
        self.root = (Path(str(raw.get("out_dir", "runs"))) / self.name).resolve()
        self.common = [str(s) for s in raw.get("set") or []]
        self.stages = self._parse(raw)
        self.state_file = self.root / "pipeline.json"

    # -- reading and checking --------------------------------------------------------------------
    def _parse(self, raw: DictConfig) -> List[Stage]:
        names = list(raw.stages.keys())
        outputs = {
            n: {"run": str(self.root / n), "export": str(self.root / n / "export")} for n in names
        }
        stages = []
        for i, name in enumerate(names):
            spec = raw.stages[name]
            kind = _kind(name, spec)
            resolved = _resolve(spec, outputs, names[:i], f"stage {name}")
            stages.append(
                Stage(name, kind, resolved, self.root / name, list(resolved.get("show") or []))
            )
        return stages

    def stage(self, name: str, before: Stage, kind: str = "train") -> Stage:
        """The earlier stage `name` (of `kind`), named by stage `before`."""
        earlier = self.stages[: self.stages.index(before)]
        found = next((s for s in earlier if s.name == name), None)
        if found is None or found.kind != kind:
            raise ConfigError(
                f"{self.path}: stage {before.name} names {name!r}, which is not an earlier "
                f"{kind} stage (earlier: {', '.join(s.name for s in earlier) or 'none'})"
            )
        return found

    def train_overrides(self, stage: Stage) -> List[str]:
        own = [str(s) for s in stage.spec.get("set") or []]
        where = [f"run.out_dir={self.root}", f"run.name={stage.name}", "log.console=false"]
        return [*self.common, *own, *where]

    def config_path(self, stage: Stage) -> Path:
        return (self.path.parent / str(stage.spec["train"])).resolve()

    def check(self) -> None:
        """Every train stage's config (paths an earlier stage writes need not exist yet) and every
        reference to an earlier stage, before anything runs."""
        for i, stage in enumerate(self.stages):
            pending = [str(s.dir) for s in self.stages[:i]]
            if stage.kind == "train":
                try:
                    load_config(self.config_path(stage), self.train_overrides(stage), pending)
                except ConfigError as e:
                    raise ConfigError(f"{self.path}: stage {stage.name}: {e}") from None
            elif stage.kind == "eval":
                self.stage(str(stage.spec["eval"]), stage)
            else:
                _stage_kind(stage.kind).run(stage, self, check=True)

    def describe(self) -> str:
        """The stages as they will run: kind, what they read, their overrides."""
        lines = [f"pipeline {self.name} ({self.path}): runs in {self.root}"]
        for i, s in enumerate(self.stages, 1):
            what = self.config_path(s) if s.kind == "train" else s.spec[s.kind]
            lines.append(f"[{i}] {s.name}: {s.kind} {what}")
            if s.kind == "train":
                lines += [f"      {o}" for o in self.train_overrides(s)]
        return "\n".join(lines) + "\n"

    # -- running ---------------------------------------------------------------------------------
    def done(self) -> Dict[str, Any]:
        if not self.state_file.is_file():
            return {}
        return json.loads(self.state_file.read_text()).get("done", {})

    def _mark_done(self, stage: Stage, seconds: float, figures: Dict[str, Any]) -> None:
        state = {"pipeline": str(self.path), "done": {**self.done()}}
        state["done"][stage.name] = {"seconds": round(seconds, 1), "figures": figures}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self.state_file)

    def run(self, say: Callable[[str], None] = print) -> int:
        """Every stage not yet done, in order; 0, or the exit code of the stage that stopped (85:
        stopped by a signal, checkpointed, to be resumed by the next launch). Call `check()`
        first (the command line checks every pipeline of a launch before the first one runs)."""
        self.root.mkdir(parents=True, exist_ok=True)
        record = open(self.root / "pipeline.log", "a") if dist.is_main() else None

        def say_and_record(line: str) -> None:  # to the terminal, and to pipeline.log
            say(line)
            if record:
                now = time.strftime("%Y-%m-%d %H:%M:%S")
                record.writelines(f"{now} {part}\n" for part in line.splitlines())
                record.flush()

        try:
            return self._run_all(say_and_record)
        finally:
            if record:
                record.close()

    def _run_all(self, say: Callable[[str], None]) -> int:
        done = self.done()
        say(f"pipeline {self.name}: {len(self.stages)} stages in {self.root}")
        for i, stage in enumerate(self.stages, 1):
            head = f"[{i}/{len(self.stages)}] {stage.name} ({stage.kind})"
            if stage.name in done:
                say(f"{head}: done before, skipped")
                continue
            t0 = time.perf_counter()
            code, figures = self._run_stage(stage)
            _release_memory()  # the stage's engine, model and optimizer, before the next builds its own
            if code != 0 or figures is None:
                say(f"{head}: stopped (exit {code}); the next launch resumes it")
                return code
            seconds = time.perf_counter() - t0
            if dist.is_main():
                self._mark_done(stage, seconds, figures)
            dist.barrier()
            say(f"{head}: {seconds:.0f} s{_figures(figures, stage.show)}")
            if figures.get("text"):
                say(figures["text"].rstrip("\n"))
        return 0

    def _run_stage(self, stage: Stage):
        if stage.kind == "train":
            return self._train(stage)
        if stage.kind == "eval":
            return 0, self._eval(stage)
        return 0, _stage_kind(stage.kind).run(stage, self, check=False)

    def _train(self, stage: Stage):
        from mmtrain.engine.export import export
        from mmtrain.engine.trainer import train_run

        cfg = load_config(self.config_path(stage), self.train_overrides(stage))
        code, finished = train_run(cfg)
        if code != 0 or not finished:  # a signal, or run.stop_after_steps
            return code, None
        if stage.spec.get("export"):  # rank 0, however long it takes
            dist.solo(
                lambda: export(str(stage.dir), str(stage.export), overwrite=True),
                f"exporting {stage.dir} to {stage.export}",
            )
        dist.barrier()  # rank 0 has written the export and eval.jsonl
        evals = stage.dir / "eval.jsonl"
        lines = evals.read_text().splitlines() if evals.is_file() else []
        return code, json.loads(lines[-1]) if lines else {}

    def _eval(self, stage: Stage) -> Dict[str, Any]:
        from mmtrain.engine.evaluate import run_eval

        run = self.stage(str(stage.spec["eval"]), stage)
        split, tag = str(stage.spec.get("split", "val")), stage.spec.get("tag")
        overrides = [str(s) for s in stage.spec.get("set") or []]
        return run_eval(str(run.dir), split, str(tag) if tag else None, overrides)


def _load(path: Path, overrides: Sequence[str]) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"pipeline file not found: {path}")
    mine = [o for o in overrides if o.split("=", 1)[0].split(".")[0] in TOP_KEYS]
    for_runs = [o for o in overrides if o not in mine]  # e.g. train.micro_batch_size=8
    try:
        raw = OmegaConf.load(path)
        raw = OmegaConf.merge(raw, OmegaConf.from_dotlist(mine))
        if for_runs:
            raw.set = [*(raw.get("set") or []), *for_runs]
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot read pipeline {path}: {e}") from None
    unknown = set(raw.keys()) - set(TOP_KEYS)
    if unknown:
        raise ConfigError(
            f"{path}: unknown top-level keys {sorted(unknown)} (name, out_dir, set, stages)"
        )
    if not isinstance(raw.get("stages"), DictConfig) or not raw.stages:
        raise ConfigError(f"{path}: `stages` must map stage names to stages")
    return raw


def _kind(name: str, spec: Any) -> str:
    if not isinstance(spec, DictConfig):
        raise ConfigError(
            f"stage {name}: expected a mapping such as {{train: CONFIG}}, got {spec!r}"
        )
    extra = tools.stage_kinds()
    kinds = [k for k in (*KINDS, *extra) if k in spec]
    if len(kinds) != 1:
        known = ", ".join((*KINDS, *extra))
        raise ConfigError(f"stage {name}: name exactly one kind ({known}), got {kinds or 'none'}")
    kind = kinds[0]
    allowed = {kind, *COMMON_KEYS, *KEYS.get(kind, ())}
    if kind in extra:
        allowed |= set(extra[kind].keys)
    unknown = set(spec.keys()) - allowed
    if unknown:
        raise ConfigError(
            f"stage {name}: unknown keys {sorted(unknown)} (allowed: {sorted(allowed)})"
        )
    return kind


def _resolve(spec: DictConfig, outputs: Dict[str, Dict[str, str]], earlier: List[str], where: str):
    """The stage's mapping with `${stages.NAME.run|export}` replaced; only earlier stages count."""
    visible = {n: outputs[n] for n in earlier}
    node = OmegaConf.create({"stages": visible, "spec": OmegaConf.to_container(spec)})
    try:
        return OmegaConf.to_container(node, resolve=True)["spec"]
    except OmegaConfBaseException as e:
        raise ConfigError(
            f"{where}: {e.msg.splitlines()[0] if hasattr(e, 'msg') else e} (a stage can name "
            f"${{stages.NAME.run}} or ${{stages.NAME.export}} of an earlier stage: "
            f"{', '.join(earlier) or 'none'})"
        ) from None


def _stage_kind(kind: str):
    return tools.stage_kinds()[kind]


def _figures(figures: Dict[str, Any], show: Sequence[str]) -> str:
    picked = [(k, figures[k]) for k in show if k in figures]
    if not picked:
        return ""
    text = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in picked]
    return ": " + ", ".join(text)


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

"""`mmtrain train|config|export ...`: the command line. Errors in user input exit 2 with one line."""
from __future__ import annotations

import argparse
import os
import sys

from mmtrain.config import ConfigError, load_config, to_yaml


def _cmd_config(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.get == "run_dir":
        print(cfg.run_dir)
    elif args.get:
        from omegaconf import OmegaConf

        value = OmegaConf.select(OmegaConf.structured(cfg), args.get, default=None)
        if value is None:
            raise ConfigError(f"--get {args.get}: no such key")
        print(value)
    else:
        print(to_yaml(cfg), end="")
    return 0


def _cmd_train(args) -> int:
    cfg = load_config(args.config, args.overrides)
    from mmtrain.engine import dist
    from mmtrain.engine.trainer import train

    code = train(cfg)          # an exception skips the shutdown: a dead peer would hang its barrier
    dist.shutdown()
    return code


def _cmd_export(args) -> int:
    from mmtrain.engine.export import export

    out = export(args.run_dir, args.out_dir, tag=args.tag, merge_lora=args.merge_lora, overwrite=args.overwrite)
    print(f"exported to {out}")
    return 0


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")       # models come from local directories only
    p = argparse.ArgumentParser(prog="mmtrain", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    for name, fn, help_ in (("train", _cmd_train, "train a recipe (run under deepspeed/torchrun/srun)"),
                            ("config", _cmd_config, "print the resolved, validated config")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("config", help="YAML file (may name base files with `base:`)")
        sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=3e-4")
        sp.set_defaults(fn=fn)
        if name == "config":
            sp.add_argument("--get", metavar="KEY", help="print one value (a dotted key, or run_dir)")

    sp = sub.add_parser("export", help="consolidate a checkpoint into safetensors / HF / peft layouts")
    sp.add_argument("run_dir")
    sp.add_argument("out_dir")
    sp.add_argument("--tag", help="checkpoint tag (default: latest)")
    sp.add_argument("--merge-lora", action="store_true", help="also write LoRA-merged HF models")
    sp.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    sp.set_defaults(fn=_cmd_export)

    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, FileNotFoundError, FileExistsError) as e:
        print(f"mmtrain {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

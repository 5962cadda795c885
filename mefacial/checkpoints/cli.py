"""`python -m mefacial checkpoints list|convert|push`, and the listing it prints (also used by the app)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import yaml

from ..errors import ConfigError, WeightsNotFoundError
from .convert import convert_to_safetensors
from .formats import sha256_file, sidecar_path
from .hub import hub_cache_dir, hub_offline
from .publish import push_to_hub
from .registry import load_registry, registry_path
from .resolve import checkpoint_dir, resolve_registered, user_file


def list_checkpoints(with_hash: bool = False) -> list[dict]:
    """Every registered variant: where its weights resolve to now (no network), present or not, licence.

    `hub` describes the first (preferred) Hub source and `sources` every one, in the order they are tried."""
    rows = []
    for variant, spec in load_registry().items():
        row = {"variant": variant, "config": spec.config, "licence": spec.licence,
               "hub": spec.weights.describe() if spec.weights else None,
               "sources": [source.describe() for source in spec.sources],
               "present": False, "source": None, "path": None}
        env_path = os.environ.get(spec.env_var)
        try:
            found = (user_file(env_path, "env", spec, f"${spec.env_var} =") if env_path
                     else resolve_registered(spec, offline=True, progress=False, verify=False))
            row.update(present=True, source=found.source, path=str(found.path))
            if found.hub is not None:
                row["from"] = found.hub.describe()
            if with_hash:
                row["sha256"] = sha256_file(found.path)
        except WeightsNotFoundError:
            if env_path:
                row["missing"] = f"${spec.env_var} points to a missing file: {env_path}"
            else:
                row["missing"] = ("no public weights" if not spec.sources else "not on this machine, and downloads "
                                  "are off (HF_HUB_OFFLINE=1)" if hub_offline() else "downloads from the Hub on first use")
            row["how_to_get"] = " ".join(spec.how_to_get.split())
        rows.append(row)
    return rows


def checkpoints_table(rows: list[dict]) -> str:
    """`checkpoints list` for people: one line per variant, then how to get each missing one."""
    import textwrap

    from ..console import table

    def weights(row: dict) -> str:
        if row["present"]:
            found = f"{row['source']}: {row['path']}" + (f" (from {row['from']})" if row.get("from") else "")
            return found + (f" (sha256 {row['sha256']})" if row.get("sha256") else "")
        if row.get("hub") and not row["missing"].startswith("$"):
            return "missing: " + ("not downloaded, and downloads are off (HF_HUB_OFFLINE)" if hub_offline()
                                  else "downloaded from the Hub on first use")
        return f"missing: {row['missing']}"

    lines = [table([[r["variant"], r["licence"], weights(r)] for r in rows], ["variant", "licence", "weights"])]
    missing = [r for r in rows if not r["present"] and r.get("how_to_get")]
    if missing:
        lines.append("\nHow to get the missing weights:")
        for row in missing:
            lines.append(textwrap.fill(row["how_to_get"], width=100, initial_indent=f"  {row['variant']}: ",
                                       subsequent_indent="    "))
    lines.append(f"\nRegistry: {registry_path()}\nLocal folder: {checkpoint_dir()}\nHub cache: {hub_cache_dir()}\n"
                 "--json prints all of this as JSON.")
    return "\n".join(lines)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `checkpoints list|convert|push` to the `python -m mefacial` parser."""
    parser = subparsers.add_parser("checkpoints", help="list, convert and publish weights",
                                   description="Where each variant's weights are, and tools to convert and publish them.")
    sub = parser.add_subparsers(dest="checkpoints_command", required=True)
    ls = sub.add_parser("list", help="each variant, where its weights resolve to now (no network), licence")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.add_argument("--hash", action="store_true", help="also print the sha256 of present files (to pin in the registry)")
    cv = sub.add_parser("convert", help="original .pth.tar -> .safetensors + .json config")
    cv.add_argument("src", type=Path, help="original checkpoint (.pth.tar)")
    cv.add_argument("--variant", required=True, help="variant id the weights belong to (e.g. fomm-none)")
    cv.add_argument("--config", help="config name or YAML path (default: the variant's)")
    cv.add_argument("--out", type=Path, help="output .safetensors (default: checkpoints/<variant>.safetensors)")
    ps = sub.add_parser("push", help="upload weights, config and a model card to the Hugging Face Hub")
    ps.add_argument("--variant", required=True)
    ps.add_argument("--file", required=True, type=Path, help=".pth.tar or .safetensors")
    ps.add_argument("--repo", required=True, help="user/name of the model repository (created if absent)")
    ps.add_argument("--config", help="config name or YAML path (default: the sidecar's, else the variant's)")
    ps.add_argument("--metrics", type=Path, help="JSON file of metrics for the model card")
    ps.add_argument("--private", action="store_true")
    ps.add_argument("--token", help="Hub token (default: $HF_TOKEN or the stored login)")
    ps.add_argument("--message", help="commit message")
    parser.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    """Run one `checkpoints` sub-command; returns the exit status."""
    if args.checkpoints_command == "list":
        rows = list_checkpoints(with_hash=args.hash)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(checkpoints_table(rows))
        return 0
    if args.checkpoints_command == "convert":
        dst = convert_to_safetensors(args.src, args.out, args.config, args.variant)
        print(f"wrote {dst} and {sidecar_path(dst)}")
        return 0
    if args.checkpoints_command == "push":
        metrics = None
        if args.metrics is not None:
            try:
                metrics = json.loads(args.metrics.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"--metrics {args.metrics}: not a readable JSON file ({exc})") from None
        published = push_to_hub(args.variant, args.file, args.repo, private=args.private, token=args.token,
                                metrics=metrics, config=args.config, commit_message=args.message)
        print(f"uploaded to {published.url} (commit {published.revision})")
        print("registry entry (mefacial/registry.yaml):")
        print(yaml.safe_dump({args.variant: {"sources": [published.registry_entry()]}}, sort_keys=False))
        return 0
    raise ValueError(f"unknown checkpoints command {args.checkpoints_command!r}")

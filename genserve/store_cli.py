"""`genserve store ls | show | verify | publish | alias | gc`: every subcommand takes --store."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from model_store import DEFAULT_ALIAS, IntegrityError, ModelStore, StoreError

_METRIC_KEYS = ("fd", "class_accuracy", "bits_per_dim")   # the few shown by `ls`; `show` prints them all


def _ls(args: argparse.Namespace) -> None:
    store = ModelStore.open(args.store)
    models = [args.model] if args.model else store.models()
    if not models:
        print(f"store {store.uri} is empty")
    for model in models:
        aliases = store.aliases(model)
        rows = []
        for version in store.versions(model):
            pins = ",".join(sorted(a for a, v in aliases.items() if v == version)) or "-"
            try:
                m = store.manifest(f"{model}@{version}")
            except IntegrityError:
                rows.append(("", f"{model:<10} {version:<14} {'?':<26} {pins:<16} unreadable manifest: run verify"))
                continue
            metrics = " ".join(f"{k}={m.metrics[k]:.4g}" for k in _METRIC_KEYS
                               if isinstance(m.metrics.get(k), (int, float)))
            rows.append((m.created_at, f"{model:<10} {version:<14} {m.created_at:<26} {pins:<16} {metrics}"))
        for _, line in sorted(rows):
            print(line)


def _show(args: argparse.Namespace) -> None:
    store = ModelStore.open(args.store)
    manifest = store.manifest(args.ref)
    data = manifest.to_dict()
    data["aliases"] = sorted(a for a, v in store.aliases(manifest.model).items() if v == manifest.version)
    if not args.files:
        data["files"] = {k: v["sha256"][:16] for k, v in data["files"].items()}
    print(json.dumps(data, indent=2, sort_keys=True))


def _verify(args: argparse.Namespace) -> None:
    store = ModelStore.open(args.store)
    refs = args.refs or [f"{m}@{v}" for m in store.models() for v in store.versions(m)]
    failed = 0
    for ref in refs:
        try:
            loaded = store.load(ref, use_cache=False)   # check the store itself, not this node's cache
            print(f"ok      {loaded.manifest.model}@{loaded.manifest.version} ({len(loaded.files)} files)")
        except IntegrityError as exc:
            failed += 1
            print(f"FAILED  {exc}")
    if failed:
        raise IntegrityError(f"{failed} of {len(refs)} version(s) failed verification")


def _publish(args: argparse.Namespace) -> None:
    from genserve.build import publish_checkpoint

    store = ModelStore.open(args.store)
    result = publish_checkpoint(store, args.checkpoint, model=args.model, version=args.version,
                                aliases=tuple(args.alias or ([] if args.no_alias else [DEFAULT_ALIAS])),
                                max_batch=args.max_batch)
    print(f"{result.status}: {result.detail} ({result.seconds:.1f} s)")


def _alias(args: argparse.Namespace) -> None:
    store = ModelStore.open(args.store)
    if args.delete:
        if not args.alias:
            raise StoreError("--delete needs the alias to delete")
        store.delete_alias(args.model, args.alias)
        print(f"deleted {args.model}@{args.alias}")
    elif args.alias and args.version:
        store.set_alias(args.model, args.alias, args.version)
        print(f"{args.model}@{args.alias} -> {args.version}")
    elif args.alias:
        print(f"{args.model}@{args.alias} -> {store.resolve(f'{args.model}@{args.alias}')[1]}")
    else:
        for alias, version in sorted(store.aliases(args.model).items()):
            print(f"{args.model}@{alias} -> {version}")


def _gc(args: argparse.Namespace) -> None:
    store = ModelStore.open(args.store)
    removed = store.gc(args.model, keep_recent=args.keep, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print("\n".join(f"{verb} {r}" for r in removed) or "nothing to remove")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `genserve store ...` to the top-level command's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", default=None, metavar="PATH_OR_URI",
                        help="model store: a path, file://, or s3://bucket/prefix (credentials and endpoint "
                             "from AWS_* environment variables only); default: $GENSERVE_STORE, else "
                             "./model_store_data")
    store = subparsers.add_parser("store", help="list, inspect, verify, publish and garbage-collect model versions")
    sub = store.add_subparsers(dest="store_command", required=True)

    p = sub.add_parser("ls", parents=[common], help="versions per model, with aliases and headline metrics")
    p.add_argument("model", nargs="?")
    p.set_defaults(func=_ls)

    p = sub.add_parser("show", parents=[common], help="print a version's manifest")
    p.add_argument("ref", metavar="MODEL[@VERSION|@ALIAS]")
    p.add_argument("--files", action="store_true", help="full sha256 and size of every file")
    p.set_defaults(func=_show)

    p = sub.add_parser("verify", parents=[common], help="check every file's hash (default: all versions)")
    p.add_argument("refs", nargs="*", metavar="MODEL[@VERSION|@ALIAS]")
    p.set_defaults(func=_verify)

    p = sub.add_parser("publish", parents=[common], help="export a checkpoint folder and publish it")
    p.add_argument("checkpoint", type=Path, help="folder with model.safetensors and card.json")
    p.add_argument("--model", help="store name (default: the card's family)")
    p.add_argument("--version", help="default: derived from the checkpoint hash")
    p.add_argument("--alias", action="append", help=f"alias to point at it (repeatable; default: {DEFAULT_ALIAS})")
    p.add_argument("--no-alias", action="store_true", help="move no alias")
    p.add_argument("--max-batch", type=int, default=64, help="largest batch in the latency profile")
    p.set_defaults(func=_publish)

    p = sub.add_parser("alias", parents=[common], help="list, show, set or delete aliases")
    p.add_argument("model")
    p.add_argument("alias", nargs="?")
    p.add_argument("version", nargs="?", help="point ALIAS at this version")
    p.add_argument("--delete", action="store_true")
    p.set_defaults(func=_alias)

    p = sub.add_parser("gc", parents=[common], help="remove versions no alias points to")
    p.add_argument("model", nargs="?")
    p.add_argument("--keep", type=int, default=0, help="also keep the N newest versions per model")
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(func=_gc)

"""``finetune models``: model families, where their weights come from, and what is available offline."""

from __future__ import annotations

import argparse


def cmd_models(args: argparse.Namespace) -> int:
    import textwrap

    from finetune.models import family_models
    from finetune.models.weights import OFFLINE_MODELS, network_available, offline_weights_file, weight_sources

    if args.prepare:
        for name in OFFLINE_MODELS:
            print(f"{name}: {offline_weights_file(name)}")
        return 0
    print("Offline ImageNet-1k weights (work with no network; installed by `make install`):")
    for name in OFFLINE_MODELS:
        sources = weight_sources(name)
        print(f"  {name:<24} {sources['offline']:<14} hub: {sources['hub']}")
    if args.offline_only:
        return 0
    hub = "reachable" if network_available() else "unreachable (no network)"
    print(f"\nHugging Face hub: {hub}. Other MobileNet / EfficientNet models, by family "
          "(* = weights in the local hub cache):")
    families: dict[str, list[str]] = {}
    for name in family_models():
        if name in OFFLINE_MODELS:
            continue
        family = name.split("_")[0] if not name.startswith("tf_") else "tf_" + name.split("_")[1]
        cached = weight_sources(name).get("hub") == "cached"
        families.setdefault(family, []).append(name + ("*" if cached else ""))
    for family, names in families.items():
        print(textwrap.fill(", ".join(names), width=100, initial_indent=f"  {family}: ",
                            subsequent_indent=" " * (len(family) + 4)))
    print("\nAny model also trains from --weights PATH (.safetensors/.pth) or --weights none (random init).")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``models`` to the ``finetune`` sub-commands."""
    mo = sub.add_parser("models", help="model families, where their weights come from, and availability")
    mo.add_argument("--offline-only", action="store_true", help="only the models with offline weights")
    mo.add_argument("--prepare", action="store_true", help="convert the offline weights into the cache now")
    mo.set_defaults(func=cmd_models)

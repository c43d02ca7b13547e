"""`fluxjax plan`: per-device memory of a sharding strategy, before a pod is booked.

`fluxjax plan --topology v5e:2x4` compiles the denoising step for that TPU topology on this host
(libtpu, the `tpu` extra) and reports the TPU compiler's own per-device figures (fluxjax/plan/tpu.py).

`fluxjax plan --train` tabulates a training step instead (full fine-tuning and LoRA, with and
without remat) for each strategy of --sharding (a comma-separated list; default dp,fsdp,tp,fsdp_tp).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="dev", help="FLUX.1 dev, schnell or tiny; FLUX.2 klein-4b, klein-9b or "
                                                         "flux2-dev (default dev)")
    parser.add_argument("--sharding", default=None,
                        help="strategy name from fluxjax/configs/sharding or a .toml path (default fsdp; "
                             "with --train a comma-separated list, default dp,fsdp,tp,fsdp_tp)")
    parser.add_argument("--devices", type=int, help="number of devices (accelerators) in the mesh (implied by --topology)")
    parser.add_argument("--topology", help="compile for this TPU topology on this host (v5e:1x1, v5e:2x4, v6e:2x4, "
                                           "v5p:2x2x1, ...; needs the tpu extra) and report the TPU compiler's figures")
    parser.add_argument("--slices", type=int, default=1, help="with --topology: slices joined over DCN (default 1)")
    parser.add_argument("--programs", default="denoise,encode,decode,vae_encode,flowedit",
                        help="with --topology: the pipeline's programs to compile (default all: denoise, encode, "
                             "decode, vae_encode, flowedit)")
    parser.add_argument("--variant", default="base", choices=("base", "kontext", "fill", "control"),
                        help="with --topology: the checkpoint kind whose denoising loop is compiled (kontext: with "
                             "one reference of the image's size; fill, control: their wider input)")
    parser.add_argument("--json", action="store_true", help="with --topology: print one JSON object")
    parser.add_argument("--hbm", help="memory per device, e.g. 16GiB: say whether the plan fits "
                                      "(with --train a comma-separated list, default 16GiB,80GiB)")
    parser.add_argument("--train", action="store_true", help="plan a training step (full and LoRA) instead of sampling")
    parser.add_argument("--lora-rank", type=int, default=16, help="with --train: the LoRA's rank (default 16)")
    parser.add_argument("--remat", action="store_true",
                        help="with --train --topology: compile the step with remat, as `fluxjax train --remat` runs it")
    parser.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT in pixels (default 1024x1024)")
    parser.add_argument("--batch", type=int, help="images per step (default: one per data shard)")
    parser.add_argument("--dtype", default="bfloat16", help="parameters and activations (default bfloat16)")
    parser.add_argument("--quantize", choices=("int8", "fp8"),
                        help="the transformer's and T5's Linears weight-only int8 or fp8, as `fluxjax generate "
                             "--quantize` loads them (docs/quantization.md): their parameter bytes, and with --topology "
                             "the programs compiled so (not with --train)")
    parser.add_argument("--no-xla", dest="xla", action="store_false",
                        help="skip the AOT compile on simulated CPU devices (analytic activations only)")


def run(args) -> int:
    from fluxjax.errors import UsageError
    from fluxjax.plan.planner import format_plan, make_plan, parse_bytes, parse_size
    from fluxjax.parallel.strategies import Strategy

    if args.quantize and args.train:
        raise UsageError("--quantize plans sampling: training keeps float32 master weights (leave out --train)")
    if args.topology:
        return _topology(args)
    if args.json:
        raise UsageError("--json goes with --topology")
    if args.devices is None:
        raise UsageError("--devices N is needed (or --topology NAME, which implies it)")
    if args.devices < 1:
        raise UsageError(f"--devices {args.devices}: must be at least 1")
    height, width = parse_size(args.size)
    if args.train:
        return _train(args, height, width)
    args.sharding = args.sharding or "fsdp"
    hbm = parse_bytes(args.hbm) if args.hbm else None
    plan = make_plan(args.model, Strategy.load(args.sharding), args.devices, height, width, args.batch, args.dtype, hbm, args.xla,
                     quantize=args.quantize)
    print(format_plan(plan))
    return 0


def _train(args, height: int, width: int) -> int:
    from fluxjax.errors import UsageError
    from fluxjax.plan.planner import check_model, format_train_plans, parse_bytes, train_plan
    from fluxjax.parallel.strategies import Strategy

    check_model(args.model)
    if args.lora_rank < 1:
        raise UsageError(f"--lora-rank {args.lora_rank}: must be at least 1")
    hbms = [parse_bytes(h) for h in (args.hbm or "16GiB,80GiB").split(",")]
    strategies = [Strategy.load(name.strip()) for name in (args.sharding or "dp,fsdp,tp,fsdp_tp").split(",")]
    dtype = "float32" if args.dtype == "float32" else "bfloat16"
    plans = [train_plan(args.model, s, args.devices, height, width, args.batch, rank, dtype)
             for s in strategies for rank in (None, args.lora_rank)]
    print(format_train_plans(plans, args.model, height, width, hbms))
    return 0


def _topology(args) -> int:
    """The TPU compiler's figures for the pipeline's programs on `args.topology` (fluxjax/plan/tpu.py)."""
    import json

    from fluxjax.plan import tpu as plan_tpu
    from fluxjax.errors import UsageError
    from fluxjax.plan.planner import FLUX2_PRESETS, GIB, TEXT_LENGTHS, check_model, make_plan, parse_size, resident
    from fluxjax.parallel.strategies import Strategy

    check_model(args.model)
    if args.model in FLUX2_PRESETS and (args.train or args.variant != "base"):
        raise UsageError(f"--model {args.model}: --topology compiles FLUX.2's sampling programs only "
                         f"({'--train' if args.train else '--variant ' + args.variant} is FLUX.1's)")
    programs = [p.strip() for p in args.programs.split(",") if p.strip()]
    if not programs or any(p not in plan_tpu.PROGRAMS for p in programs):
        raise UsageError(f"--programs {args.programs!r}: choose from {', '.join(plan_tpu.PROGRAMS)}")
    height, width = parse_size(args.size)
    strategy = Strategy.load(args.sharding or "fsdp")
    devices = plan_tpu.topology_devices(args.topology, args.slices)
    if args.devices is not None and args.devices != len(devices):
        raise UsageError(f"--devices {args.devices}: topology {args.topology} x {args.slices} slice(s) has {len(devices)}")
    if args.train:
        return _train_topology(args, strategy, devices, height, width)
    attention = plan_tpu.transformer_attention(strategy, devices, args.dtype)
    analytic = make_plan(args.model, strategy, len(devices), height, width, args.batch, args.dtype, xla=False,
                         attention=attention, quantize=args.quantize, device_kind=devices[0].device_kind)
    got = plan_tpu.compile_programs(args.model, strategy, devices, analytic.padded_batch, height, width,
                                    TEXT_LENGTHS[args.model], args.dtype, programs=programs, variant=args.variant,
                                    quantize=args.quantize)
    first = next(iter(got.values()))
    hbm = first["compiled"]["hbm_bytes"]
    # Exact per-device parameter bytes (shapes and the table) of the components the device holds
    # (T5 and CLIP leave for the host CPU where all do not fit, as the pipeline's residency="auto"
    # places them), and the largest temporaries of the programs it runs, one at a time.
    held = resident(analytic, {name: g["compiled"]["temp_bytes"] for name, g in got.items()}, hbm)
    report = dict(topology=args.topology, slices=args.slices, device_kind=first["device_kind"], devices=len(devices),
                  model=args.model, variant=args.variant, strategy=strategy.name, mesh=analytic.mesh_shape,
                  size=f"{width}x{height}", batch=analytic.padded_batch, dtype=args.dtype, quantize=args.quantize,
                  attention=attention, mosaic_kernels=first["mosaic_kernels"], compiled=first["compiled"],
                  analytic=dict(total_bytes=analytic.params["transformer"].device_bytes + analytic.analytic_bytes),
                  collectives={k: v["count"] for k, v in first["collectives"].items()},
                  collective_bytes={k: v["bytes"] for k, v in first["collectives"].items()},
                  programs={name: dict(compiled=g["compiled"], mosaic_kernels=g["mosaic_kernels"],
                                       collectives={k: v["count"] for k, v in g["collectives"].items()})
                            for name, g in got.items()},
                  resident=held)
    if args.json:
        print(json.dumps(report))
        return 0
    gib = lambda n: "?" if n is None else f"{n / GIB:.2f} GiB"  # noqa: E731
    mesh = " x ".join(f"{a}={n}" for a, n in report["mesh"].items())
    print(f"model {args.model}, {args.dtype}{', ' + args.quantize + ' weights' if args.quantize else ''}, {width}x{height}, batch {report['batch']}; strategy {strategy.name} on "
          f"{args.topology} ({len(devices)} x {report['device_kind']}): mesh {mesh}; attention {report['attention']}")
    print("compiled by the TPU compiler; per device:")
    for name, g in got.items():
        c = g["compiled"]
        kernels = "" if not g["mosaic_kernels"] else f", {g['mosaic_kernels']} Mosaic kernel(s)"
        coll = ", ".join(f"{k} {v['count']} ({v['bytes'] / 2**20:.1f} MiB)" for k, v in g["collectives"].items()) or "none"
        state = f"refused: {c['refused']}" if c.get("refused") else (
            f"arguments {gib(c['argument_bytes'])}, temporaries {gib(c['temp_bytes'])}, outputs {gib(c['output_bytes'])}")
        print(f"  {name:<10} {state}; {c['compile_s']:.1f} s{kernels}; collectives {coll}")
    which = "every component" if held["residency"] == "device" else "the transformer and the VAE"
    print(f"  resident   parameters of {which} {gib(held['param_bytes'])} [exact] + the largest temporaries "
          f"{gib(held['largest_temp_bytes'])} = {gib(held['total_bytes'])}")
    if held["note"]:
        print(f"  residency  {held['note']}")
    print(f"  analytic   transformer step {gib(report['analytic']['total_bytes'])} [fluxjax plan without --topology]")
    if hbm is not None:
        print(f"{'fits' if report['resident']['fits'] else 'does NOT fit'} in {gib(hbm)} of HBM per chip")
    return 0


def _train_topology(args, strategy, devices, height: int, width: int) -> int:
    """The TPU compiler's figures for `fluxjax train`'s step, full fine-tuning and LoRA."""
    import json
    from types import SimpleNamespace

    from fluxjax.plan import tpu as plan_tpu
    from fluxjax.errors import UsageError
    from fluxjax.plan.planner import GIB, T5_LENGTHS, train_plan

    if args.lora_rank < 1:
        raise UsageError(f"--lora-rank {args.lora_rank}: must be at least 1")
    dtype = "float32" if args.dtype == "float32" else "bfloat16"
    got, analytic = {}, {}
    for name, rank in (("train_full", None), ("train_lora", args.lora_rank)):
        plan = train_plan(args.model, strategy, len(devices), height, width, args.batch, rank, dtype,
                          attention=plan_tpu.transformer_attention(strategy, devices, dtype))
        data = strategy.data_size(SimpleNamespace(shape=strategy.mesh_shape(len(devices))))
        batch = -(-(args.batch or data) // data) * data  # as train_plan: one image per data shard by default
        got[name] = plan_tpu.compile_train_step(args.model, strategy, devices, batch, height, width,
                                                T5_LENGTHS[args.model], rank, args.remat, dtype)
        analytic[name] = plan.total(args.remat)
    first = got["train_full"]
    report = dict(topology=args.topology, slices=args.slices, device_kind=first["device_kind"], devices=len(devices),
                  model=args.model, strategy=strategy.name, size=f"{width}x{height}", batch=batch, remat=args.remat,
                  attention=plan_tpu.transformer_attention(strategy, devices, dtype),
                  mosaic_kernels=first["mosaic_kernels"], compiled=first["compiled"],
                  analytic=dict(total_bytes=analytic["train_full"]),
                  collectives={k: v["count"] for k, v in first["collectives"].items()},
                  programs={name: dict(compiled=g["compiled"], mosaic_kernels=g["mosaic_kernels"],
                                       analytic=dict(total_bytes=analytic[name]),
                                       collectives={k: v["count"] for k, v in g["collectives"].items()})
                            for name, g in got.items()})
    if args.json:
        print(json.dumps(report))
        return 0
    gib = lambda n: "?" if n is None else f"{n / GIB:.2f} GiB"  # noqa: E731
    print(f"training step of {args.model} at {width}x{height}, batch {batch}, {'remat' if args.remat else 'no remat'}; "
          f"strategy {strategy.name} on {args.topology} ({len(devices)} x {report['device_kind']}); attention "
          f"{report['attention']}; compiled by the TPU compiler, per device:")
    for name, g in got.items():
        c = g["compiled"]
        state = f"refused: {c['refused']}" if c.get("refused") else (
            f"total {gib(c['total_bytes'])} (arguments {gib(c['argument_bytes'])}, temporaries {gib(c['temp_bytes'])})")
        verdict = "" if c["fits"] is None else ("fits" if c["fits"] else "does NOT fit") + f" in {gib(c['hbm_bytes'])}"
        print(f"  {name:<10} {state}; {c['compile_s']:.1f} s; analytic {gib(analytic[name])}; {verdict}")
    return 0

"""Training-step throughput of the OFFICIAL JAX M3AE code (young-geng/m3ae_public) at the
bench-cpu.yaml size, to put a same-machine denominator under our samples/s.

Run with a separate JAX virtual environment (JAX is no dependency of this project), pointing at
an extracted copy of the official repository; nothing of it is copied here:

    python3 -m venv /tmp/jaxvenv
    /tmp/jaxvenv/bin/pip install "jax[cpu]==0.10.2" flax==0.12.8 optax==0.2.8 \
        ml_collections einops numpy dill cloudpickle tqdm
    /tmp/jaxvenv/bin/python benchmarks/official_jax_step.py --official-repo /tmp/m3ae_official \
        --threads 2 --steps 6 --warmup 2

``--threads N`` pins the process to N cores (XLA sizes its thread pool to the cores it may use).
``--xla-single-thread`` sets XLA_FLAGS for one intra-op thread instead (same speed as one pinned
core on the AVX2 EPYC). The first steps after compilation are slow: keep ``--warmup`` >= 2.

The step is the official one: ``m3ae_main.create_train_step`` (pmapped over the one CPU device:
forward with both masks, patch MSE + text cross-entropy weighted 1.0 / 0.1 as the script's
defaults, backward, clip_by_global_norm(1e9) + AdamW(b2=0.95, wd 0.05, masked) exactly as
``m3ae_main.main`` builds them). ``m3ae_main`` imports data/logging libraries the step never
uses (torch, wandb, timm, gcsfs, ...); they are replaced by empty stand-ins before the import.
"""
import argparse
import os
import statistics
import sys
import time
import types

# bench-cpu.yaml (preset base) in the official flags' names; keep in sync with that file.
BENCH_CPU = dict(image_size=64, patch_size=8, vocab_size=30522, text_len=32, batch_size=32,
                 emb_dim=192, depth=6, num_heads=3, dec_emb_dim=128, dec_depth=2,
                 dec_num_heads=4, mlp_ratio=4, image_mask_ratio=0.75, text_mask_ratio=0.75)

# Imported by m3ae_main / data.py / utils.py / vqgan.py but unused by the train step.
# The GPU size of benchmarks/device_check.sh (ViT-B/16 M3AE, 256 px, captions padded to 64, batch
# 256), as train_throughput.py --preset base --batch 256 --text-len 64 runs ours.
H200 = dict(BENCH_CPU, image_size=256, patch_size=16, text_len=64, batch_size=256, emb_dim=768, depth=12,
            num_heads=12, dec_emb_dim=512, dec_depth=8, dec_num_heads=16)
SIZES = {"bench-cpu": BENCH_CPU, "h200": H200}

UNUSED_IMPORTS = ["torch", "torch.utils", "torch.utils.data", "torchvision", "torchvision.transforms",
                  "wandb", "gcsfs", "h5py", "skimage", "skimage.io", "skimage.color", "transformers",
                  "PIL", "PIL.Image", "PIL.ImageFilter", "timm", "timm.data", "timm.data.constants",
                  "requests", "vqgan_jax", "vqgan_jax.modeling_flax_vqgan"]


class _AnyMeta(type):
    """Any attribute of a stand-in is another stand-in class (so ``torch.utils.data.Dataset``
    can be subclassed at import time)."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _AnyMeta(name, (), {})


def install_stand_ins() -> None:
    for name in UNUSED_IMPORTS:
        if name in sys.modules:
            continue
        mod = types.ModuleType(name)
        mod.__getattr__ = lambda attr, _n=name: _AnyMeta(attr, (), {})
        sys.modules[name] = mod


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official-repo", required=True, help="extracted young-geng/m3ae_public")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU cores the process may run on (sched_setaffinity); XLA sizes its pool to them; "
                        "0 = leave the affinity alone (GPU runs)")
    p.add_argument("--size", choices=sorted(SIZES), default="bench-cpu",
                   help="bench-cpu (default) or h200: ViT-B/16, 256 px, text 64, batch 256")
    p.add_argument("--xla-single-thread", action="store_true",
                   help="instead: XLA_FLAGS=--xla_cpu_multi_thread_eigen=false "
                        "intra_op_parallelism_threads=1 (no pinning; combine with taskset)")
    p.add_argument("--steps", type=int, default=6, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--batch", type=int, default=0, help="default: the size's batch")
    p.add_argument("--json", help="write the record here")
    return p.parse_args()


def main():
    args = parse_args()
    if not os.path.isfile(os.path.join(args.official_repo, "m3ae", "m3ae_main.py")):
        sys.exit(f"error: {args.official_repo} has no m3ae/m3ae_main.py (extract young-geng/m3ae_public there)")
    # Both must happen before jax initialises its CPU client.
    if args.xla_single_thread:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    elif args.threads:
        cpus = sorted(os.sched_getaffinity(0))
        if not 1 <= args.threads <= len(cpus):
            sys.exit(f"error: --threads {args.threads}: this process may use {len(cpus)} CPU(s)")
        if len(cpus) != args.threads:
            # Re-run under the new mask, exactly as `taskset -c` would start it.
            os.sched_setaffinity(0, cpus[:args.threads])
            os.execv(sys.executable, [sys.executable, *sys.argv])
    sys.path.insert(0, os.path.abspath(args.official_repo))
    install_stand_ins()

    import flax
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from m3ae import m3ae_main
    from m3ae.jax_utils import next_rng
    from m3ae.utils import set_random_seed
    from m3ae.model import M3AETrainState, MaskedMultimodalAutoencoder

    c = SIZES[args.size]
    b = args.batch or c["batch_size"]
    flags = m3ae_main.FLAGS
    flags(["official_jax_step", f"--patch_size={c['patch_size']}", f"--batch_size={b}"])
    # The same as --m3ae.emb_dim=192 etc. (ml_collections registers those only from sys.argv).
    flags.m3ae.update({k: c[k] for k in ("emb_dim", "depth", "num_heads", "dec_emb_dim", "dec_depth",
                                         "dec_num_heads", "mlp_ratio", "image_mask_ratio", "text_mask_ratio")})
    set_random_seed(flags.seed)

    # As m3ae_main.main builds them (1 process, 1 device, no checkpoint, continuous pixels).
    devices = jax.local_devices()
    patch_dim = c["patch_size"] ** 2 * 3
    n_patches = (c["image_size"] // c["patch_size"]) ** 2
    model = MaskedMultimodalAutoencoder(config_updates=flags.m3ae, text_vocab_size=c["vocab_size"],
                                        image_output_dim=patch_dim)
    lr_scale = b / 256
    learning_rate = optax.warmup_cosine_decay_schedule(
        init_value=flags.lr_init_value * lr_scale, peak_value=flags.lr_peak_value * lr_scale,
        warmup_steps=0, decay_steps=100_000, end_value=flags.lr_end_value * lr_scale)

    def get_weight_decay_mask(params):
        flat = flax.traverse_util.flatten_dict(flax.core.frozen_dict.unfreeze(params))
        return flax.traverse_util.unflatten_dict(
            {key: all(k not in model.no_decay_list() for k in key) for key in flat})

    params = model.init(next_rng(keys=model.rng_keys()),
                        jnp.zeros((2, n_patches, patch_dim), jnp.float32),
                        jnp.zeros((2, c["text_len"]), jnp.int32),
                        jnp.zeros((2, c["text_len"])), deterministic=False)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    state = flax.jax_utils.replicate(M3AETrainState.create(
        params=flax.core.frozen_dict.unfreeze(params), tokenizer_params=None, apply_fn=None,
        tx=optax.chain(optax.clip_by_global_norm(flags.clip_gradient),
                       optax.adamw(learning_rate=learning_rate, weight_decay=flags.weight_decay,
                                   b1=0.9, b2=0.95, mask=get_weight_decay_mask))), devices)
    del params
    train_step_fn, _ = m3ae_main.create_train_step(model, learning_rate)
    # jax.device_put_sharded (m3ae_main's call) is gone from jax 0.10: stack, then device_put.
    rng = jax.device_put(jnp.stack(next_rng(len(devices))), devices[0])
    acc_grads = flax.jax_utils.replicate(jnp.array(0, jnp.int32), devices)
    acc_steps = flax.jax_utils.replicate(jnp.array(0, jnp.int32), devices)

    # Random inputs of our benchmark's shapes: captions of 10..25 real tokens, padded to 32.
    g = np.random.default_rng(0)
    lengths = g.integers(10, 26, size=b)
    pad = (np.arange(c["text_len"])[None] >= lengths[:, None]).astype(np.float32)
    text = np.where(pad > 0, 0, g.integers(1000, c["vocab_size"], size=(b, c["text_len"])))
    batch = {"image": g.standard_normal((1, b, c["image_size"], c["image_size"], 3), np.float32),
             "text": text[None].astype(np.int32), "text_padding_mask": pad[None]}
    batch = jax.device_put(batch, devices[0])

    def step():
        nonlocal state, rng, acc_grads, acc_steps
        state, metrics, rng, acc_grads, acc_steps = train_step_fn(state, rng, acc_grads, acc_steps, batch)
        jax.block_until_ready((state, metrics))
        return metrics

    t0 = time.perf_counter()
    metrics = step()  # compiles
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        step()
    wall, cpu = [], []
    for _ in range(args.steps):
        w0, c0 = time.perf_counter(), time.process_time()
        metrics = step()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    loss = float(np.asarray(metrics["loss"])[0])
    med_w, med_c = statistics.median(wall), statistics.median(cpu)
    threads = "xla-single-thread" if args.xla_single_thread else args.threads or "all"
    rec = {"impl": "official-jax", "size": args.size, "device": str(devices[0]), "threads": threads, "batch": b, "steps": args.steps,
           "warmup": args.warmup, "params": int(n_params), "compile_s": round(compile_s, 1),
           "step_s_median": round(med_w, 4), "samples_per_s": round(b / med_w, 1),
           "samples_per_cpu_s": round(b / med_c, 1), "loss_last": round(loss, 4),
           "step_s_all": [round(x, 4) for x in wall], "jax": jax.__version__,
           "flax": flax.__version__, "optax": optax.__version__}
    print(f"official JAX M3AE step on {devices[0]}, size {args.size}, threads {threads}, batch {b}, {n_params / 1e6:.2f} M params: "
          f"median {med_w * 1000:.0f} ms/step over {args.steps} steps = {rec['samples_per_s']} samples/s "
          f"({rec['samples_per_cpu_s']} samples per CPU-second); compile {compile_s:.1f} s; loss {loss:.3f}")
    if args.json:
        import json
        with open(args.json, "w") as f:
            json.dump(rec, f, indent=1)


if __name__ == "__main__":
    main()

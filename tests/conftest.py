import os, sys
from pathlib import Path
import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('MPLBACKEND', 'Agg')
ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT/'tests'/'fixtures'/'official'


@pytest.fixture
def fixtures_dir():
    "The official-implementation fixtures kept with the project (tests/fixtures/official); a missing one fails."
    assert FIXTURES.is_dir(), f"official fixtures not found at {FIXTURES}"
    return FIXTURES


@pytest.fixture(scope='session')
def tiny_latents(tmp_path_factory):
    "(tokenizer folder, latents run): 48 `shapes` images (with flips, 20 classes) encoded by a freshly initialised tiny tokenizer."
    import torch
    from vtp_nbdev.tokenizer import VTPModel, vtp_config
    from vtp_nbdev.latents import extract_latents
    d = tmp_path_factory.mktemp('lat')
    torch.manual_seed(0)
    VTPModel(vtp_config('tiny', train_clip=False)).save_pretrained(d/'tok')
    return d/'tok', extract_latents(d/'tok', 'shapes', n=48, dataset_kwargs={'size': 48}, runs_dir=d/'runs', shard_size=20,
                                    stats_samples=48, progress=False)


def end_process_group():
    "Tear a rank's process group down once every rank got here (a rank must not leave while its peer communicates)."
    import torch.distributed as dist
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture
def spawn_ranks():
    "Run `fn(rank, world, port, *args)` in `world` spawned processes (gloo rendezvous on a free local port)."
    import socket, torch.multiprocessing as mp
    def run(fn, *args, world=2):
        with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
        mp.start_processes(fn, args=(world, port, *args), nprocs=world, join=True, start_method='spawn')
    return run

"Command lines as installed console scripts: exit status 0 on success, clear config errors, no orphan run directory."
import json, os, subprocess, sys
from pathlib import Path
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMALL = dict(vision_depth=1, decoder_depth=1, text_depth=1, dino_out_dim=64, dino_hidden_dim=32, dino_bottleneck_dim=16)
PRE = ['steps=2', 'losses=AE', 'batch_clip=4', 'batch_rec=4', 'log_every=1', f'model={json.dumps(SMALL)}',
       'dataset_kwargs={"size": 8}']


def _run(cmd, **kw):
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1', 'VTP_THREADS': '1',
           'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, **kw)


def _script(name):
    p = BIN/name
    if not p.exists():
        pytest.fail(f"console script {p} is not installed (pip install -e .)")
    return str(p)


def test_vtp_pretrain_exits_zero(tmp_path):
    out = _run([_script('vtp-pretrain'), '--runs-dir', str(tmp_path), '--device', 'cpu', '--no-progress', '--set', *PRE])
    assert out.returncode == 0, out.stderr[-2000:]
    run = Path(out.stdout.strip().splitlines()[-1])
    assert (run/'done.json').exists() and run.parent == tmp_path/'tokenizer'
    again = _run([_script('vtp-pretrain'), '--runs-dir', str(tmp_path), '--no-progress', '--set', *PRE])
    assert again.returncode == 0 and Path(again.stdout.strip()) == run                  # finished: reused


@pytest.mark.parametrize('content, msg', [(None, 'no such file'), ('{"steps": ', 'not valid JSON'),
                                          ('[1, 2]', 'expected a JSON object'),
                                          ('{"stepz": 2}', "unknown PretrainConfig keys ['stepz']"),
                                          ('{"steps": "2"}', "PretrainConfig.steps='2'")])
def test_bad_config_file_is_named(tmp_path, content, msg):
    cfg = tmp_path/'run.json'
    if content is not None:
        cfg.write_text(content)
    out = _run([_script('vtp-pretrain'), '--config', str(cfg), '--runs-dir', str(tmp_path/'runs'), '--no-progress'])
    assert out.returncode == 2, out.stderr[-2000:]
    assert str(cfg) in out.stderr and msg in out.stderr and 'Traceback' not in out.stderr, out.stderr
    assert not (tmp_path/'runs').exists()


def test_dataset_error_claims_no_run_dir(tmp_path):
    "A dataset that cannot be built stops before the run directory exists."
    cfg = tmp_path/'run.json'
    cfg.write_text(json.dumps({'dataset': 'image_text', 'steps': 2}))
    out = _run([_script('vtp-pretrain'), '--config', str(cfg), '--runs-dir', str(tmp_path/'runs'), '--no-progress'])
    assert out.returncode == 2 and "needs dataset_kwargs['source']" in out.stderr and 'Traceback' not in out.stderr
    cfg.write_text(json.dumps({'dataset': 'image_text', 'dataset_kwargs': {'source': str(tmp_path/'none.csv')}}))
    out = _run([_script('vtp-pretrain'), '--config', str(cfg), '--runs-dir', str(tmp_path/'runs'), '--no-progress'])
    assert out.returncode == 1 and 'none.csv' in out.stderr and 'Traceback' not in out.stderr, out.stderr[-2000:]
    assert not list((tmp_path/'runs').rglob('config.json'))



def test_missing_image_in_csv_claims_no_run_dir(tmp_path):
    "A CSV naming a missing image: the error names the file and line, and no run directory is left behind."
    from PIL import Image
    from vtp_nbdev.data import split_of
    Image.new('RGB', (40, 40), (200, 30, 30)).save(tmp_path/'red.png')
    assert split_of('red.png') == 'train'
    gone = next(f'blue{i}.png' for i in range(100) if split_of(f'blue{i}.png') == 'train')   # a training row
    (tmp_path/'pairs.csv').write_text(f'path,caption\nred.png,a red square\n{gone},a blue square\n')
    runs = tmp_path/'runs'
    data = ['dataset=image_text', f'dataset_kwargs={json.dumps({"source": str(tmp_path/"pairs.csv")})}']
    out = _run([_script('vtp-pretrain'), '--runs-dir', str(runs), '--device', 'cpu', '--no-progress', '--set',
                *[a for a in PRE if not a.startswith('dataset_kwargs')], *data])
    assert out.returncode == 1 and 'Traceback' not in out.stderr, out.stderr[-2000:]
    assert f"{tmp_path/'pairs.csv'}:3" in out.stderr and gone in out.stderr, out.stderr[-2000:]
    assert not runs.exists() or not any(runs.rglob('*')), sorted(runs.rglob('*'))

def test_vtp_train_dit_exits_zero_and_names_wrong_types(tiny_latents, tmp_path):
    _, lat = tiny_latents
    base = [_script('vtp-train-dit'), '--latents-dir', str(lat), '--runs-dir', str(tmp_path), '--device', 'cpu',
            '--no-progress', '--set', 'steps=2', 'batch=4', 'log_every=1']
    out = _run(base)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (Path(out.stdout.strip())/'done.json').exists()
    for v, got in (('"64"', 'str'), ('64.0', 'float')):
        bad = _run(base + [f'model={{"hidden_size": {v}}}'])
        assert bad.returncode == 2 and 'Traceback' not in bad.stderr, bad.stderr[-2000:]
        assert f"DiTTrainConfig.model: hidden_size={json.loads(v)!r} must be int, got {got}" in bad.stderr, bad.stderr


def test_t2i_command_line(tiny_latents, tmp_path):
    _, lat = tiny_latents
    out = _run([sys.executable, '-m', 'vtp_nbdev.t2i', '--latents-dir', str(lat), '--runs-dir', str(tmp_path),
                '--device', 'cpu', '--no-progress', '--set', 'steps=2', 'batch=4', 'log_every=1',
                'text={"width": 32, "depth": 1, "heads": 2}'])
    assert out.returncode == 0, out.stderr[-2000:]
    run = Path(out.stdout.strip())
    assert run.parent.name == 't2i' and (run/'done.json').exists()


def test_threads_from_settings(tiny_latents, tmp_path, monkeypatch):
    "Every training entry point applies the settings' thread count (VTP_THREADS)."
    from vtp_nbdev.pretrain import PretrainConfig, pretrain
    from vtp_nbdev.gan import finetune_decoder_gan, GANFinetuneConfig
    from vtp_nbdev.flow import DiTTrainConfig, train_dit
    from vtp_nbdev.t2i import T2ITrainConfig, train_t2i
    _, lat = tiny_latents
    monkeypatch.setenv('VTP_THREADS', '1')
    pcfg = PretrainConfig(model=SMALL, losses='AE', steps=1, batch_clip=4, batch_rec=4, log_every=1, ckpt_every=1,
                          dataset_kwargs={'size': 8})
    dcfg = dict(steps=1, batch=4, log_every=1, ckpt_every=1)
    calls = [lambda: pretrain(pcfg, tmp_path, 'cpu', progress=False),
             lambda: finetune_decoder_gan(pretrain(pcfg, tmp_path, 'cpu', progress=False), GANFinetuneConfig(steps=1, batch=2),
                                          'cpu', progress=False),
             lambda: train_dit(DiTTrainConfig(**dcfg), lat, tmp_path, 'cpu', progress=False),
             lambda: train_t2i(T2ITrainConfig(**dcfg, text=dict(width=32, depth=1, heads=2)), lat, tmp_path, 'cpu',
                               progress=False)]
    before = torch.get_num_threads()
    try:
        for call in calls:
            torch.set_num_threads(2)
            call()
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)

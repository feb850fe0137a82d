"""A user's own data, end to end: captioned images as tar shards and a CSV (with a few bad members) through
pre-training, the GAN decoder stage, export, reload, evaluation (retrieval + reconstruction) and latent extraction;
a labelled image folder through the scaling FLOP count, pre-training, latents and the DiT; caption-only latents
through an unconditional DiT, its samples and the generation measurement with a named extractor; a reference network
trained at the images' own resolution under the runs directory setting, read by rFD at any image size."""
import csv, io, json, tarfile, time, warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from vtp_nbdev import losses
from vtp_nbdev.data import ShapesDataset, get_dataset
from vtp_nbdev.eval_reconstruction import evaluate_tokenizer
from vtp_nbdev.latents import extract_latents
from vtp_nbdev.pretrain import PretrainConfig, pretrain
from vtp_nbdev.gan import GANFinetuneConfig, finetune_decoder_gan
from vtp_nbdev.tokenizer import VTPModel

N = 40


def _add(tf, name, data: bytes):
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def build_user_data(root: Path, n: int = N) -> dict:
    "What a user brings: `images/` with PNG and JPEG files, `pairs.csv` (paths relative to it) and `shards/*.tar`."
    (root/'images').mkdir(parents=True)
    (root/'shards').mkdir()
    ds, rows = ShapesDataset('train', size=n, res=48), []                         # 48 px: resized to the model's 32
    with tarfile.open(root/'shards'/'part-000.tar', 'w') as t0, tarfile.open(root/'shards'/'part-001.tar', 'w') as t1:
        for i in range(n):
            img, caption, _ = ds.raw(i)
            ext = 'png' if i % 2 else 'jpg'
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format='PNG' if ext == 'png' else 'JPEG', quality=95)
            (root/'images'/f'{i:03d}.{ext}').write_bytes(buf.getvalue())
            rows.append((f'images/{i:03d}.{ext}', caption))
            tf = t0 if i < n // 2 else t1
            _add(tf, f'{i:03d}.{ext}', buf.getvalue())
            _add(tf, f'{i:03d}.txt', caption.encode())
        _add(t1, 'corrupt.jpg', b'\xff\xd8\xff\xe0 not really a jpeg')               # bad members
        _add(t1, 'corrupt.txt', b'a broken picture')
        _add(t1, 'lonely.png', buf.getvalue())                                       # no caption
        _add(t1, 'blank.png', buf.getvalue())
        _add(t1, 'blank.txt', b'   ')                                                 # empty caption
    rows += [('images/missing.png', 'a file that is not there'), ('images/000.jpg', '')]
    with open(root/'pairs.csv', 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['path', 'caption'])
        w.writerows(rows)
    return dict(csv=str(root/'pairs.csv'), shards=str(root/'shards'))


@pytest.fixture(scope='module')
def user_data(tmp_path_factory):
    return build_user_data(tmp_path_factory.mktemp('own'))


def test_both_sources_load_with_held_out_splits(user_data):
    "CSV and a folder of shards read the same pairs; train / test are disjoint by key; bad members skipped or named."
    for src, n_bad in ((user_data['csv'], 2), (user_data['shards'], 3)):
        parts = {s: get_dataset('image_text', s, source=src, skip_bad=True, val_frac=0.15, test_frac=0.3)
                 for s in ('train', 'val', 'test')}
        assert sum(len(d) for d in parts.values()) == N + n_bad
        assert parts['test'][0]['image'].shape == (3, 32, 32) and parts['test'][0]['label'] == -1
    train = get_dataset('image_text', 'train', source=user_data['shards'])
    test = get_dataset('image_text', 'test', source=user_data['shards'])
    assert not {it[1] for it in train.items} & {it[1] for it in test.items}
    strict = get_dataset('image_text', 'all', source=user_data['shards'])             # without skip_bad: named errors
    errors = []
    for i in range(len(strict)):
        try:
            strict[i]
        except ValueError as e:
            errors.append(str(e))
    assert len(errors) == 3 and all('part-001.tar' in e for e in errors), errors
    assert any('part-001.tar:corrupt: cannot read image' in e for e in errors)
    assert any("'lonely' has no caption" in e for e in errors)


def test_pretrain_evaluate_and_latents_end_to_end(user_data, tmp_path):
    "Pre-training on the tar shards and the CSV, the GAN stage, export and reload, retrieval + reconstruction, latents."
    t0 = time.perf_counter()
    runs = tmp_path/'runs'
    kw = dict(preset='tiny', steps=3, batch_clip=8, batch_ssl=4, batch_rec=4, n_local_crops=2, log_every=1,
              ckpt_every=3)
    losses._WARNED.discard('lpips')
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        shards = dict(source=user_data['shards'], skip_bad=True)
        run = pretrain(PretrainConfig(dataset='image_text', dataset_kwargs=shards, **kw), runs_dir=runs, progress=False)
    assert len([x for x in w if 'LPIPS disabled' in str(x.message)]) == 1             # the one-time message
    run_csv = pretrain(PretrainConfig(dataset='image_text', dataset_kwargs=dict(source=user_data['csv'], skip_bad=True),
                                      **dict(kw, steps=1)), runs_dir=runs, progress=False)
    assert (run_csv/'final'/'model.safetensors').is_file() and run_csv != run
    gan = finetune_decoder_gan(run, GANFinetuneConfig(steps=2, batch=4, disc_start=1), device='cpu', progress=False)
    assert (gan/'final'/'model.safetensors').is_file()

    model = VTPModel.from_pretrained(run/'final', rope_dtype='fp32')                  # export -> reload
    model.save_pretrained(tmp_path/'exported')
    again = VTPModel.from_pretrained(tmp_path/'exported', rope_dtype='fp32')
    x = get_dataset('image_text', 'test', source=user_data['shards'], skip_bad=True)[0]['image'][None]
    with torch.no_grad():
        assert torch.equal(model(x), again(x))

    ev = evaluate_tokenizer(tmp_path/'exported', 'image_text', n_rec=64, batch_size=32, out=tmp_path/'metrics.json',
                            dataset_kwargs=dict(source=user_data['shards'], skip_bad=True, test_frac=0.3))
    saved = json.loads((tmp_path/'metrics.json').read_text())
    r = saved['retrieval']
    n_test = saved['n_samples']['test']
    assert r['n'] == n_test >= 8
    assert 0 <= r['image_to_text_R@1'] <= r['image_to_text_R@5'] <= r['image_to_text_R@10'] <= 1
    assert {'text_to_image_R@1', 'text_to_image_R@10'} <= set(r) and saved['labelled'] is False
    rec = saved['reconstruction']
    assert rec['n'] == n_test and rec['psnr'] > 5 and -1 <= rec['ssim'] <= 1
    assert rec['rFID'] is None and 'train_reference_extractor' in rec['rFID_note']
    assert saved['zero_shot'] is None and 'no class labels' in saved['notes']['zero_shot']
    print({k: round(v, 3) for k, v in r.items() if 'R@' in k}, 'psnr', round(rec['psnr'], 2))

    lat = extract_latents(run/'final', 'image_text', 'train', runs_dir=runs, batch_size=16, progress=False,
                          dataset_kwargs=dict(source=user_data['csv'], skip_bad=True))
    done = json.loads((lat/'done.json').read_text())
    assert (lat/'latents_stats.safetensors').is_file() and done
    print(f"end to end: {time.perf_counter() - t0:.1f} s")


def test_pretrain_dataset_keys_named(user_data, tmp_path):
    "A key no dataset takes is named before training starts; `size` is a subset for file datasets too."
    with pytest.raises(ValueError, match=r"does not take \['colour'\]"):
        pretrain(PretrainConfig(steps=1, dataset='image_text', dataset_kwargs=dict(source=user_data['csv'], colour=1)),
                 runs_dir=tmp_path, progress=False)
    assert len(get_dataset('image_text', 'train', source=user_data['csv'], size=5, seed=7)) == 5
    with pytest.raises(ValueError, match='image_text needs source='):
        get_dataset('image_text', 'train')


def test_make_shards_from_csv(user_data, tmp_path):
    "`data_prep/make_shards.py` packs the CSV's good rows into shards that read back as the same pairs."
    import importlib.util
    spec = importlib.util.spec_from_file_location('make_shards', Path(__file__).parents[1]/'data_prep'/'make_shards.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    shards = mod.make_shards(user_data['csv'], tmp_path/'packed', per_shard=16)
    assert len(shards) == 3
    packed = get_dataset('image_text', 'all', source=tmp_path/'packed')
    table = get_dataset('image_text', 'all', source=user_data['csv'], skip_bad=True)
    assert len(packed) == N
    assert [packed[i]['caption'] for i in range(N)] == [table.load(i)[1] for i in range(N)]
    assert torch.equal(packed[5]['image'], table[5]['image'])


def test_image_folder_through_scaling_latents_and_dit(tmp_path):
    "A labelled folder goes through the scaling code's FLOP count, pre-training, latents and class-conditional DiT."
    from vtp_nbdev.flow import DiTTrainConfig, train_dit
    from vtp_nbdev.scaling import flops_per_step
    ds = ShapesDataset('train', size=40)
    for i in range(40):
        img, _, label = ds.raw(i)
        d = tmp_path/'pets'/('reddish' if label % 4 == 0 else 'other')
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d/f'{i}.png')
    data = dict(root=str(tmp_path/'pets'))
    cfg = PretrainConfig(preset='tiny', steps=2, batch_clip=8, batch_ssl=4, batch_rec=4, n_local_crops=2, log_every=1,
                         ckpt_every=2, dataset='image_folder', dataset_kwargs=data)
    assert flops_per_step(cfg) > 0                                                  # passes `size` and `seed`
    run = pretrain(cfg, runs_dir=tmp_path/'runs', progress=False)
    lat = extract_latents(run/'final', 'image_folder', 'train', dataset_kwargs=data, runs_dir=tmp_path/'runs',
                          progress=False)
    dit = train_dit(DiTTrainConfig(steps=2, batch=8, log_every=1, ckpt_every=2, model={'depth': 1}), lat,
                    tmp_path/'runs', 'cpu', progress=False)
    assert (dit/'final').is_dir()


def test_caption_only_data_trains_an_unconditional_dit(user_data, tmp_path):
    "Caption-only latents (every label -1) train an unconditional DiT that samples images; FD names its extractor."
    import shutil
    from safetensors.torch import load_file, save_file
    from vtp_nbdev.dit import load_lightningdit
    from vtp_nbdev.flow import DiTTrainConfig, train_dit, sample_images
    from vtp_nbdev.generate import GenerationEvalConfig, NoReferenceExtractorError, generation_metrics
    from vtp_nbdev.tokenizer import vtp_config
    t0 = time.perf_counter()
    torch.manual_seed(0)
    VTPModel(vtp_config('tiny', train_clip=False)).save_pretrained(tmp_path/'tok')
    runs, data = tmp_path/'runs', dict(source=user_data['shards'], skip_bad=True, test_frac=0.3)
    lat = extract_latents(tmp_path/'tok', 'image_text', 'train', dataset_kwargs=data, runs_dir=runs, progress=False)
    cfg = DiTTrainConfig(steps=2, batch=8, log_every=1, ckpt_every=2, model={'depth': 1})
    run = train_dit(cfg, lat, runs, 'cpu', progress=False)
    assert json.loads((run/'done.json').read_text())['conditioning'] == 'unconditional'
    model, _ = load_lightningdit(run/'final')
    assert (model.num_classes, model.y_embedder.dropout_prob) == (1, 0.)                  # one class, no null class
    imgs, labels = sample_images(run, tmp_path/'tok', n=4, steps=3, device='cpu')
    assert imgs.shape == (4, 3, 32, 32) and imgs.dtype == torch.uint8 and labels.tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match='without label dropout'):                         # no guidance unless asked
        sample_images(run, tmp_path/'tok', n=2, steps=2, cfg_scale=2.0, device='cpu')
    asked = train_dit(DiTTrainConfig(**{**cfg.to_dict(), 'model': {'depth': 1, 'class_dropout_prob': 0.1}}), lat,
                      runs, 'cpu', progress=False)
    assert sample_images(asked, tmp_path/'tok', n=2, steps=2, cfg_scale=2.0, device='cpu')[0].shape == (2, 3, 32, 32)

    mixed = tmp_path/'mixed'                                                              # some labelled, some not
    shutil.copytree(lat, mixed)
    (mixed/'config.json').write_text(json.dumps({**json.loads((lat/'config.json').read_text()), 'copy': 'mixed'}))
    shard = load_file(mixed/'shard-00000.safetensors')
    shard['labels'][:3] = 0
    save_file(shard, str(mixed/'shard-00000.safetensors'), metadata={'total_size': str(len(shard['labels']))})
    with pytest.raises(ValueError, match=r'mix unlabelled latents \(label -1'):
        train_dit(cfg, mixed, runs, 'cpu', progress=False)

    gen = dict(dataset='image_text', dataset_kwargs=data, n_latents=8, n_samples=8, n_ref=8, steps=3,
               dit=dict(preset='tiny', steps=2, batch=8, log_every=1, ckpt_every=2))
    with pytest.raises(NoReferenceExtractorError, match="no reference extractor for dataset 'image_text'"):
        generation_metrics(tmp_path/'tok', GenerationEvalConfig(**gen), runs_dir=runs, device='cpu', progress=False)
    m = generation_metrics(tmp_path/'tok', GenerationEvalConfig(**gen, extractor='shapes'), runs_dir=runs,
                           device='cpu', progress=False)
    assert m['conditioning'] == m['label_sampling'] == 'unconditional' and m['FD_shapes'] > 0 and m['n2'] == 8
    print(f"caption-only DiT: {time.perf_counter() - t0:.1f} s")


def _load_reference_script():
    import importlib.util
    script = Path(__file__).parents[1]/'data_prep'/'train_reference_extractor.py'
    spec = importlib.util.spec_from_file_location('tre', script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_reference_extractor_at_the_datas_resolution_in_the_runs_dir(tmp_path, monkeypatch):
    "`train_reference_extractor.py` trains at the images' own size, writes under VTP_RUNS_DIR, uses VTP_THREADS."
    from vtp_nbdev.eval_reconstruction import reconstruction_metrics
    from vtp_nbdev.fid import REFERENCE_EXTRACTORS
    from vtp_nbdev.tokenizer import vtp_config
    ds = ShapesDataset('train', size=48, res=48)                                       # 48-px labelled images
    for i in range(48):
        img, _, label = ds.raw(i)
        d = tmp_path/'pets'/('reddish' if label % 4 == 0 else 'other')
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d/f'{i}.png')
    monkeypatch.setenv('VTP_RUNS_DIR', str(tmp_path/'elsewhere'))
    monkeypatch.setenv('VTP_THREADS', '1')
    threads = torch.get_num_threads()
    tre = _load_reference_script()
    try:
        path = tre.main(['--dataset', 'image_folder', '--root', str(tmp_path/'pets'), '--epochs', '1'])
        assert path == tmp_path/'elsewhere'/'reference'/'pets.safetensors'
        report = json.loads(path.with_suffix('.json').read_text())
        assert (report['res'], report['threads']) == (48, 1)
        torch.manual_seed(0)
        data = get_dataset('image_folder', 'test', root=str(tmp_path/'pets'), res=48, test_frac=0.3)
        m48 = VTPModel(vtp_config('tiny', image_size=48)).eval()
        at48 = reconstruction_metrics(m48, data, n=8, extractor=str(path))
        assert at48['rFID_metric'] == 'FD_pets' and at48['rFID'] > 0 and 'rFID_note' not in at48   # read as they are
        data32 = get_dataset('image_folder', 'test', root=str(tmp_path/'pets'), test_frac=0.3)
        at32 = reconstruction_metrics(VTPModel(vtp_config('tiny')).eval(), data32, n=8, extractor=str(path))
        assert at32['rFID'] > 0 and "32x32 images resized to the reference network's 48x48" in at32['rFID_note']
        none = reconstruction_metrics(VTPModel(vtp_config('tiny')).eval(), data32, n=8, extractor=None)
        assert str(tmp_path/'elsewhere'/'reference') in none['rFID_note']                # names where the file lands
        with pytest.raises(SystemExit):
            tre.main(['--dataset', 'image_folder', '--root', str(tmp_path/'pets'), '--res', '30'])
    finally:
        REFERENCE_EXTRACTORS.pop('pets', None)
        torch.set_num_threads(threads)

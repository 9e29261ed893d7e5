"""The captioner, offline: a tiny BLIP built from a config and loaded through the same path as a hub model."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from explainer.captions.captioner import (
    Captioner,
    CaptionerConfig,
    CaptionInterrupted,
    CaptionService,
    GenerationSettings,
    cache_key,
    create_captioner,
    list_captioners,
)
from explainer.cli.app import app
from explainer.settings import Settings, get_settings
from retrieval import Collection, Encoder, IngestConfig
from retrieval.demo.blip import make_blip
from retrieval.errors import ConfigError, ModelUnavailable
from retrieval.ingest import ingest
from tests.helpers import draw_shape, make_folder

runner = CliRunner()
GEN = GenerationSettings(num_beams=1, max_new_tokens=10, min_new_tokens=1)
#: A small vocabulary makes [SEP] likely enough that random captions end at different lengths, so
#: batched generation has to pad finished rows: the case a batching bug would break.
WORDS = [
    "a",
    "photography",
    "of",
    "red",
    "green",
    "blue",
    "circle",
    "square",
    "left",
    "right",
    "top",
    "bottom",
]


@pytest.fixture(scope="module")
def tiny_blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_blip(tmp_path_factory.mktemp("tiny-blip"), "tiny", words=WORDS, seed=0)


@pytest.fixture(scope="module")
def captioner(tiny_blip_dir: Path) -> Iterator[Captioner]:
    cap = create_captioner(  # fp32: these tests compare captions (auto may be int8 or bf16)
        CaptionerConfig(
            model=str(tiny_blip_dir), device="cpu", batch_size=4, generation=GEN, precision="fp32"
        )
    )
    yield cap
    cap.close()


class Counting:
    """Counts the images each model call sees; optionally interrupts a call, like Ctrl-C would."""

    def __init__(self, inner: Captioner, interrupt_on_call: int | None = None) -> None:
        self.inner, self.name, self.fingerprint = inner, inner.name, inner.fingerprint
        self.calls: list[int] = []
        self.interrupt_on_call = interrupt_on_call

    def caption(
        self,
        images: Sequence[Image.Image],
        prefix: str | None = None,
        interrupt: Callable[[], bool] | None = None,
    ) -> list[str]:
        self.calls.append(len(images))
        if self.interrupt_on_call == len(self.calls):
            raise KeyboardInterrupt
        return self.inner.caption(images, prefix, interrupt)

    def close(self) -> None:
        pass


def _shapes(tmp_path: Path, n: int) -> list[Image.Image]:
    return [Image.open(draw_shape(tmp_path / f"s{i}.png", i)).convert("RGB") for i in range(n)]


def test_batched_captions_equal_one_at_a_time(captioner: Captioner, tmp_path: Path) -> None:
    images = _shapes(tmp_path, 6)
    batched = captioner.caption(images)  # two batches of 4 and 2
    singles = [captioner.caption([im])[0] for im in images]
    assert batched == singles
    assert all(batched) and len(set(batched)) > 1  # images steer the captions: a mix-up would show
    assert len({len(t.split()) for t in batched}) > 1  # some rows finished early and were padded
    assert isinstance(captioner, Captioner)
    assert captioner.name == "tiny-blip0" and GEN.key() in captioner.fingerprint


def test_warm_up_changes_no_caption(captioner: Captioner, tmp_path: Path) -> None:
    images = _shapes(tmp_path, 2)
    before = captioner.caption(images)
    captioner.warm_up()  # type: ignore[attr-defined]  # BlipCaptioner's own, called by the server's worker
    assert captioner.caption(images) == before


def test_an_interrupt_abandons_the_generation_at_the_next_step(captioner: Captioner, tmp_path: Path) -> None:
    images = _shapes(tmp_path, 2)
    assert captioner.caption(images, interrupt=lambda: False) == captioner.caption(images)  # never fires

    steps: list[int] = []

    def after_the_first_token() -> bool:  # asked before the batch, then once per decoding step
        steps.append(1)
        return len(steps) > 1

    with pytest.raises(CaptionInterrupted):  # min_new_tokens=1: no row can end before that step
        captioner.caption(images, interrupt=after_the_first_token)
    assert len(steps) == 2  # stopped at the step it was asked to, not at the end of the caption
    with pytest.raises(CaptionInterrupted):  # already due: the model is not even run
        captioner.caption(images, interrupt=lambda: True)
    assert captioner.caption(images[:1]) == captioner.caption(images)[:1]  # the model is left usable


def test_prefix_is_honoured(captioner: Captioner, tmp_path: Path) -> None:
    images = _shapes(tmp_path, 3)
    out = captioner.caption(images, prefix="A photography  of")
    assert all(t.startswith("a photography of ") and len(t.split()) > 3 for t in out), out
    assert out == [captioner.caption([im], prefix="a photography of")[0] for im in images]
    assert cache_key(captioner, " a photography of") == f"{captioner.fingerprint}|prefix=a photography of"


def test_generation_settings_come_from_settings_and_key_the_cache(
    tiny_blip_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLEARSIGHT_CAPTION_NUM_BEAMS", "2")
    monkeypatch.setenv("CLEARSIGHT_CAPTION_MAX_NEW_TOKENS", "6")
    monkeypatch.setenv("CLEARSIGHT_CAPTION_MIN_NEW_TOKENS", "6")
    cfg = CaptionerConfig.from_settings(Settings(), model=str(tiny_blip_dir), batch_size=None)
    assert cfg.generation == GenerationSettings(num_beams=2, max_new_tokens=6, min_new_tokens=6)
    assert cfg.batch_size == "auto" and cfg.resolved_batch_size() == 8 and cfg.model == str(tiny_blip_dir)
    beams = create_captioner(cfg)
    assert "beams=2,max=6,min=6" in beams.fingerprint
    assert len(beams.caption([Image.new("RGB", (40, 30), "red")])[0].split()) == 6
    beams.close()
    with pytest.raises(ConfigError, match="min_new_tokens"):
        GenerationSettings(max_new_tokens=3, min_new_tokens=5)


def test_missing_or_wrong_models_give_one_clear_message(tiny_clip_dir: Path, tmp_path: Path) -> None:
    assert {s.name for s in list_captioners()} >= {"blip-base", "blip-large"}
    with pytest.raises(ModelUnavailable) as err:
        create_captioner(CaptionerConfig(model=None, device="cpu"))
    msg = str(err.value)
    assert "Salesforce/blip-image-captioning-base" in msg and "download" in msg and "\n" not in msg
    with pytest.raises(ModelUnavailable, match="is a clip model"):
        create_captioner(str(tiny_clip_dir))
    with pytest.raises(ModelUnavailable, match="does not exist"):
        create_captioner(str(tmp_path / "nowhere"))


def _indexed(tmp_path: Path, encoder: Encoder, n: int) -> tuple[Collection, list[Path]]:
    images = tmp_path / "images"
    files = make_folder(images, n)
    shutil.copy(files[0], images / "copy_of_0.jpg")  # same content, another path
    collection = Collection(tmp_path / "data")
    ingest(images, collection, encoder, IngestConfig(progress=False))
    return collection, files


def test_cache_by_content_resume_and_failures(captioner: Captioner, encoder: Encoder, tmp_path: Path) -> None:
    collection, files = _indexed(tmp_path, encoder, 6)
    records = collection.catalog.iter_images("indexed")
    assert len(records) == 7

    # Interrupted during the second batch: the first batch is kept.
    first = Counting(captioner, interrupt_on_call=2)
    with pytest.raises(KeyboardInterrupt):
        CaptionService(collection, first, batch_size=2).caption_collection()
    assert first.calls == [2, 2]

    # --limit caps the model's work; the rest waits for the next run.
    limited = Counting(captioner)
    r = CaptionService(collection, limited, batch_size=2).caption_collection(limit=2)
    assert (r.captioned, r.cached, r.remaining) == (2, 2, 2) and limited.calls == [2]

    files[5].unlink()  # gone since indexing: counted, not fatal
    rest = Counting(captioner)
    r = CaptionService(collection, rest, batch_size=2).caption_collection()
    assert (r.images, r.contents, r.captioned, r.cached, r.failed) == (7, 6, 1, 4, 1)
    assert r.failures == {"unreadable": 1} and rest.calls == [1]

    again = Counting(captioner)
    r = CaptionService(collection, again, batch_size=2).caption_collection()
    assert again.calls == [] and (r.captioned, r.cached) == (0, 5)

    # Identical content at two paths: captioned once, attached to both images.
    by_path = {Path(rec.path).name: rec.id for rec in records}
    caps = collection.catalog.captions_for(list(by_path.values()))
    twin = [caps[by_path[name]] for name in ("img_0000.jpg", "copy_of_0.jpg")]
    assert len(twin[0]) == len(twin[1]) == 1 and twin[0][0].text == twin[1][0].text
    assert all(c[0].source == "generated:tiny-blip0" for c in twin)
    hash0 = next(rec.content_hash for rec in records if rec.path.endswith("img_0000.jpg"))
    assert hash0 and r.captions[hash0] == twin[0][0].text

    # A prefix writes other captions, so it is cached under its own key.
    prefixed = Counting(captioner)
    r = CaptionService(collection, prefixed, batch_size=4, prefix="a photography of").caption_collection()
    assert sum(prefixed.calls) == 5 and all(t.startswith("a photography of") for t in r.captions.values())
    collection.close()


@pytest.fixture()
def caption_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("CLEARSIGHT_CAPTION_MAX_NEW_TOKENS", "8")
    monkeypatch.setenv("CLEARSIGHT_CAPTION_MIN_NEW_TOKENS", "2")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.mark.usefixtures("caption_settings")
def test_cli_caption_then_image_to_text_search(
    tiny_clip_dir: Path, tiny_blip_dir: Path, tmp_path: Path
) -> None:
    images, data = tmp_path / "images", tmp_path / "data"
    files = make_folder(images, 5)
    shutil.copy(files[1], images / "again.jpg")
    r = runner.invoke(app, ["index", str(images), "-m", str(tiny_clip_dir), "--data-dir", str(data), "-q"])
    assert r.exit_code == 0, r.output

    r = runner.invoke(app, ["caption", "--data-dir", str(data), "-q"])  # default captioner: not here
    assert r.exit_code == 3 and r.stderr.count("\n") == 1 and "blip-image-captioning-base" in r.stderr

    args = ["caption", "--data-dir", str(data), "-m", str(tiny_blip_dir), "--batch-size", "2", "-q"]
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert (out["images"], out["captioned"], out["cached"], out["failed"]) == (6, 5, 0, 0)
    assert out["index"]["generated_captions"] == 6 and out["source"] == "generated:tiny-blip0"
    assert "max=8,min=2" in out["fingerprint"]

    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("captioned 0 images now, 5 from cache, 0 failed")

    r = runner.invoke(
        app, ["search", "--image", str(files[2]), "--captions", "--data-dir", str(data), "--json"]
    )
    assert r.exit_code == 0, r.output
    hits = json.loads(r.stdout)["results"]
    assert hits and all(h["source"].startswith("generated:") for h in hits)
    assert {h["path"] for h in hits} <= {str(p) for p in [*files, images / "again.jpg"]}


@pytest.mark.usefixtures("caption_settings")
def test_index_caption_captions_right_after_encoding_and_status_counts_it(
    tiny_clip_dir: Path, tiny_blip_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images, data = tmp_path / "images", tmp_path / "data"
    make_folder(images, 4)
    monkeypatch.setenv("CLEARSIGHT_CAPTION_MODEL", str(tiny_blip_dir))
    get_settings.cache_clear()
    args = ["index", str(images), "-m", str(tiny_clip_dir), "--data-dir", str(data), "-q", "--json"]
    r = runner.invoke(app, [*args, "--caption"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["encoded"] == 4  # stdout stays one JSON object; captioning reports on stderr
    assert r.stderr.startswith("captioned 4 images now")
    r = runner.invoke(app, ["status", "--data-dir", str(data), "--json"])
    assert json.loads(r.stdout)["captions"] == {"indexed": 4, "done": 4, "total": 4}

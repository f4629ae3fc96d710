"""The procedural captioned dataset: deterministic, and its captions say what is drawn."""
import numpy as np

import asdm.training.shapes as sh


def test_same_seed_same_scenes_other_seed_other_scenes():
    a, b, c = sh.generate(12, 48, seed=3), sh.generate(12, 48, seed=3), sh.generate(12, 48, seed=4)
    assert all(np.array_equal(x.image, y.image) and x.caption == y.caption for x, y in zip(a, b))
    assert any(not np.array_equal(x.image, y.image) for x, y in zip(a, c))
    # scene i depends on (seed, i) only: a longer set starts with the same scenes
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, sh.generate(20, 48, seed=3)))


def test_captions_state_what_is_drawn_where():
    scenes = sh.generate(60, 64, seed=0)
    assert {len(s.items) for s in scenes} == {1, 2}
    for s in scenes:
        assert s.caption == sh.caption_of(s.items)
        for it in s.items:
            assert f"a {it.color} {it.shape} {sh.PHRASE[it.region]}" in s.caption
            # the shape's colour fills the middle of its region
            fx, fy = sh.REGIONS[it.region]
            px = s.image[int(fy * 64), int(fx * 64)].astype(int)
            assert np.abs(px - np.array(sh.COLORS[it.color])).max() <= 1, (s.caption, px)
        if len(s.items) == 2:
            assert s.items[0].color != s.items[1].color
            assert tuple(sorted(i.region for i in s.items)) in (("left", "right"), ("bottom", "top"))


def test_folder_layout_is_what_the_trainer_reads(tmp_path):
    scenes = sh.write_folder(str(tmp_path), 3, 32, seed=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"0000{i}.{e}" for i in range(3) for e in ("png", "txt")]
    assert (tmp_path / "00001.txt").read_text().strip() == scenes[1].caption

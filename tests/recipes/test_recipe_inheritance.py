"""Recipe inheritance: ``base = "NAME"`` plus overrides, resolved before validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from densehybrid.cli import main
from densehybrid.recipes import expand_recipe, list_recipes, load_recipe, recipe_path

#: `densehybrid recipes --json` of the shipped presets as they were before the -finetune and -flow presets became
#: short overrides of their parents (captured from that tree, then Adam eps 1e-8 in the two COCO20 fine-tunings as
#: released); the resolved values must not move. The `generic` entry follows that recipe's own changes (its "auto"
#: values and the EfficientNet-Lite0 ladder): an entry is regenerated as `densehybrid recipes --json NAME` without its
#: "param_groups", written with json.dumps(..., indent=1, sort_keys=True).
RESOLVED_BEFORE = Path(__file__).parent / "data" / "presets-resolved.json"
CHILDREN = {
    "ldn121-streethazards-finetune": "ldn121-streethazards",
    "segmenter-coco20-finetune": "segmenter-coco20",
    "ldn121-streethazards-finetune-flow": "ldn121-streethazards-finetune",
    "segmenter-coco20-finetune-flow": "segmenter-coco20-finetune",
    "dlv3p-cityscapes-finetune-flow": "dlv3p-cityscapes-finetune",
}


def test_every_preset_resolves_exactly_as_before_it_inherited(capsys):
    before = json.loads(RESOLVED_BEFORE.read_text())
    assert set(before) <= set(list_recipes())
    assert main(["recipes", "--json", *sorted(before)]) == 0
    after = json.loads(capsys.readouterr().out)
    for name, resolved in before.items():
        shown = {k: v for k, v in after[name].items() if k != "param_groups"}
        assert shown == resolved, name


@pytest.mark.parametrize("child,parent", sorted(CHILDREN.items()))
def test_finetune_and_flow_presets_are_short_overrides_of_their_parents(child, parent):
    text = Path(str(recipe_path(child))).read_text(encoding="utf-8")
    assert f'base = "{parent}"' in text
    assert len(text.splitlines()) < 50
    assert load_recipe(child)["name"] == child  # the name is never inherited


def test_recipes_json_prints_the_learning_rate_of_every_parameter_group(capsys):
    assert main(["recipes", "--json", "ldn121-streethazards-finetune", "ldn121-streethazards-finetune-flow"]) == 0
    shown = json.loads(capsys.readouterr().out)
    groups = {g["group"]: g for g in shown["ldn121-streethazards-finetune"]["param_groups"]}
    assert groups["decoder and heads"]["lr"] == pytest.approx(1e-5)
    assert groups["backbone"]["lr"] == pytest.approx(1e-5 * 0.25)
    assert "flow" not in groups
    flow = {g["group"]: g for g in shown["ldn121-streethazards-finetune-flow"]["param_groups"]}["flow"]
    assert flow["optimizer"] == "adamax" and flow["lr"] == pytest.approx(1e-3)  # no flow.init: the random-init rate


def test_a_file_inherits_a_file_and_overrides_keys(tmp_path):
    (tmp_path / "parent.toml").write_text(
        'base = "ldn121-streethazards"\n[optim]\nepochs = 3\n[model.kwargs]\nextra = 1\n', encoding="utf-8"
    )
    sub = tmp_path / "sub"
    sub.mkdir()
    child = sub / "child.toml"
    child.write_text('base = "../parent.toml"\n[optim]\nlr = 1e-3\n', encoding="utf-8")
    recipe = load_recipe(child, ["optim.batch_size=2"])
    assert recipe["name"] == "child"
    assert recipe["optim"]["epochs"] == 3 and recipe["optim"]["lr"] == 1e-3 and recipe["optim"]["batch_size"] == 2
    assert recipe["augment"]["crop"] == 768  # from the shipped grandparent
    assert recipe["model"]["kwargs"] == {"checkpointing": True, "extra": 1}  # tables merge key by key
    assert "base" not in expand_recipe(child)


def test_inheritance_cycles_and_unknown_bases_are_refused(tmp_path):
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text('base = "b.toml"\nmethod = "closed-set"\n', encoding="utf-8")
    b.write_text('base = "a.toml"\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"cycle: .*a\.toml -> .*b\.toml -> .*a\.toml"):
        load_recipe(a)
    c = tmp_path / "c.toml"
    c.write_text('base = "no-such-recipe"\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"Cannot resolve `base = 'no-such-recipe'`.*Unknown recipe"):
        load_recipe(c)
    d = tmp_path / "d.toml"
    d.write_text("base = 3\n", encoding="utf-8")
    with pytest.raises(ValueError, match="Expected `base`"):
        load_recipe(d)
    e = tmp_path / "e.toml"
    e.write_text('base = "ldn121-streethazards"\n[optim]\nepochz = 3\n', encoding="utf-8")
    with pytest.raises(ValueError, match="optim.epochz"):  # validated after the chain is laid together
        load_recipe(e)

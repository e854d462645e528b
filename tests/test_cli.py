from sharq.cli import main


def test_demo_prints_a_row_per_recipe(capsys):
    assert main(["demo", "--tokens", "8", "--k", "64", "--n", "16", "--recipes", "bf16,nvfp4,sharq"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[3:]] == ["bf16", "nvfp4", "sharq"]


def test_unknown_recipe_is_a_one_line_error(capsys):
    assert main(["demo", "--recipes", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sharq: error: unknown recipe 'nope'") and err.count("\n") == 1

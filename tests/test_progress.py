"""The driver's progress display and the workers' report_line (no Ray needed)."""

import io

from raycache import progress


def test_format_line_has_units_rate_eta_and_fields():
    line = progress.format_line("train:bce", 40, 80, elapsed=4.0, unit="pairs", loss=0.31234, epoch=1)
    assert line.startswith("[train:bce] 40/80 pairs (50%)")
    assert "10.0 pairs/s" in line and "ETA 00:04" in line and "loss 0.3123" in line and "epoch 1" in line


def test_report_line_prints_one_compact_line_without_a_listening_display(capsys):
    progress.report_line("train:sld", 10, 100, loss=0.5)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("[train:sld] 10/100 pairs (10%)") and "loss 0.5" in out[0]


def test_display_off_a_terminal_writes_lines_and_a_closing_note():
    buf = io.StringIO()
    display = progress.Display(file=buf, tty=False, line_every_s=0.0)
    progress.update(5)  # no stage open: nothing happens
    with display.stage("mine", "2/7 mine", "prompts") as stage:
        progress.set_total(10)
        progress.update(4)
        progress.update(6, status="done")
        stage.note = "12 s · 9 pairs"
    text = buf.getvalue()
    assert "[2/7 mine] 4/10 prompts (40%)" in text
    assert text.strip().splitlines()[-1].endswith("· 12 s · 9 pairs")
    assert progress._active is None
    table = display.table(["stage", "seconds"], [["mine", 12.0], ["train", 130.5]])
    assert "mine" in table and "130.5" in buf.getvalue()


def test_next_part_offsets_worker_reports():
    buf = io.StringIO()
    display = progress.Display(file=buf, tty=False, line_every_s=1e9)
    with display.stage("train", "4/7 train", "pairs", total=200) as stage:
        progress.next_part(100)  # the second job's workers count from 0 again
        stage.reports["train:sld"] = (30.0, 100.0, "pairs", {"loss": 0.2})
        stage.set_done(stage.offset + 30)
        assert stage.done == 130


def test_quiet_turns_off_ray_data_and_transformers_output():
    import ray.data
    import transformers

    env = progress.quiet(verbose=False)
    ctx = ray.data.DataContext.get_current()
    assert not ctx.enable_progress_bars and not ctx.print_on_execution_start
    assert not transformers.utils.logging.is_progress_bar_enabled()
    assert env["TRANSFORMERS_VERBOSITY"] == "error"
    assert progress.quiet(verbose=True) == {}


def test_rate_counts_only_units_done_since_the_first_report():
    # a resumed run reports done=1000 at once: its rate is what it did since, not 1000 / ~0 s
    line = progress.format_line("train:bce", 1100, 2000, elapsed=10.0, unit="pairs", since_done=1000)
    assert "10.0 pairs/s" in line
    assert "pairs/s" not in progress.format_line("train:bce", 1000, 2000, elapsed=0.001, since_done=1000)

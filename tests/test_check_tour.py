"""tests/check_tour.py, the check of the README tour against a demo run: what it masks and what it catches."""
import check_tour


def log(*lines: str) -> list[tuple[str, list[str]]]:
    return [(command, output) for _, command, output in check_tour.commands(["################ 0_x.py", *lines])]


def test_a_run_of_other_paths_times_and_hub_commits_fits_the_tour():
    shown = log(
        "$ loraops merge style:0.7 --into llama-tiny -o demo-output/02_merge/merged",
        "merged style@1:0.7 → demo-output/02_merge/merged: 8 tensors merged; 178.8 KiB in 0.02 s (8.0 MiB/s), "
        "bfloat16 on cpu, peak memory 353.6 MiB",
        "…",
        "pulled someone/anime-lora (commit d9f70aa77d2f) as anime@2",
        "$ HF_HUB_OFFLINE=1 loraops verify",
    )
    ran = log(
        "$ loraops merge style:0.7 --into llama-tiny -o /home/me/loraops/demo-output/02_merge/merged",
        "merged style@1:0.7 → /home/me/loraops/demo-output/02_merge/merged: 8 tensors merged; 178.8 KiB in 1.25 s "
        "(143.0 KiB/s), bfloat16 on cpu, peak memory 401.0 MiB",
        "a line the tour leaves out",
        "pulled someone/anime-lora (commit 6f39664146da) as anime@2",
        "",
        "$ loraops verify",
    )
    assert [command for command, _ in ran] == [command for command, _ in shown]
    assert check_tour.fits(shown[0][1], ran[0][1])


def test_a_stale_line_or_sha256_does_not_fit():
    shown = log("$ loraops base list", "1  llama-tiny  21  F32  ea7d9710036c")[0][1]
    assert not check_tour.fits(shown, log("$ loraops base list", "1  llama-tiny  21  float32  ea7d9710036c")[0][1])
    assert not check_tour.fits(shown, log("$ loraops base list", "1  llama-tiny  21  F32  ea7d9710036d")[0][1])


def test_lines_shown_out_of_order_do_not_fit():
    ran = log("$ loraops verify", "a", "b")[0][1]
    assert check_tour.fits(["a", "…", "b"], ran)
    assert not check_tour.fits(["b", "a"], ran)


def test_every_page_it_checks_shows_commands():
    for page, first, last in check_tour.PAGES:
        assert check_tour.shown(page, first, last), page

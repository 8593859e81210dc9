"""The status bar tells how the last reply was made: speed, the cloud's part, privacy."""

from textual.app import App, ComposeResult

from floe_app.tui.widgets.status import StatusBar

FUSED = {"mode": "fused", "tokens_per_s": 41.5, "ttft_ms": 180.0, "tokens": 30,
         "cloud": {"agreed": 0.5, "fused": 0.1, "absent": 0.4, "requests": 1,
                   "private_from": -1, "batches": {"count": 2, "accepted": 0.4}}}


class StatusHost(App):
    def compose(self) -> ComposeResult:
        yield StatusBar()


async def test_status_names_the_clouds_part_batches_and_a_private_reply():
    host = StatusHost()
    async with host.run_test() as pilot:
        bar = host.query_one(StatusBar)
        bar.last_stats = FUSED
        await pilot.pause()
        line = str(bar.render())
        assert "41.5 tok/s" in line and "cloud agreed 50% fused 10% absent 40%" in line
        assert "40% from batches" in line and "private" not in line
        bar.last_stats = {**FUSED, "cloud": {**FUSED["cloud"], "private_from": 0,
                                             "batches": {"count": 0, "accepted": 0.0}}}
        await pilot.pause()
        line = str(bar.render())
        assert "private: the cloud was left out" in line and "batches" not in line
        bar.last_stats = {**FUSED, "mode": "local"}
        await pilot.pause()
        assert "cloud" not in str(bar.render())

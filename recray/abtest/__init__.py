"""Online A/B experiments on the simulated worlds: assignment, the harness, statistics, reports.

Pure numpy/scipy/pandas: no Ray here (the Ray fan-out lives in `recray.platform.abtest`), so the
serving endpoint and the harness share one assignment function without pulling each other in.
"""

"""The residency advisor behind `tracedoffload advise`: from one run's trace, the time per token
and peak device memory of other resident layer counts, residency policies, prefetch depths and
batch sizes, and a recommendation.

    measured.py    the run's per-layer figures, from its step spans and the model's sizes
    model.py       the time model (its assumptions and where it breaks are in its docstring)
    memory.py      peak device memory, the planner's terms over the trace's sizes
    candidates.py  the configurations weighed, each predicted
    recommend.py   the choice, and why in words
    render.py      the table and the JSON
"""

"""One evaluation of an artifact against its torch reference, used by the build's validation
and quality gate, `kiln validate` and `kiln bench`.

metrics.py     what one output scores against its reference, and the tolerance gating it
components.py  one component on seeded or real feeds (the build, `kiln validate`)
end_to_end.py  a pipeline on real images or prompts (the build's gate, `kiln bench`)
"""

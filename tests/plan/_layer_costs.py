"""The hypothesis strategy for one `LayerCost` that the planner's property tests share.

Only the parameter bytes' ceiling differs between the tests (a larger ceiling makes the weight
floor refuse more splits), so it is the one argument.
"""

from hypothesis import strategies as st

from pipefold.plan import LayerCost


def layer_costs(max_parameter_bytes: int, min_parameter_bytes: int = 0) -> st.SearchStrategy[LayerCost]:
    return st.builds(
        LayerCost,
        forward_s=st.floats(0.01, 5.0),
        backward_s=st.floats(0.01, 10.0),
        activation_bytes=st.integers(0, 5000),
        output_bytes=st.integers(1, 500),
        parameter_bytes=st.integers(min_parameter_bytes, max_parameter_bytes),
    )

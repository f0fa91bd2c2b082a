"""Checks that more than one simulator test module makes of a simulated timeline."""

from pipefold.schedule.deps import backward_of, data_inputs

EPS = 1e-9


def assert_inputs_arrived(timeline, schedule, costs):
    """No action starts before each of its inputs has been produced and has crossed its link."""
    backward = backward_of(schedule)
    ends = {(e.step, e.action): e.end for row in timeline.events for e in row}
    for row in timeline.events:
        for event in row:
            for producer in data_inputs(event.action, schedule, backward):
                boundary = min(producer.stage, event.action.stage)
                delay = costs.transfer_time(boundary, schedule.rank_of(producer.stage), event.rank)
                assert event.start >= ends[(event.step, producer)] + delay - EPS

#!/usr/bin/env bash
# Purge propagation (issue 6): 1 control node + 6 edges as separate processes on
# loopback, 200 purges at 50 per second; the time from the API's acknowledgement to
# the last edge's `applied` report, as measured by the control node (`completed_ms`).
# The same measurement as bench/run-growth.sh for one fleet size (it also reports
# gossip bytes per node).
#   bench/run-purge.sh            # builds release, runs, prints a markdown table
#   PURGES=500 bench/run-purge.sh
exec env EDGES=6 PURGES="${PURGES:-200}" RATE="${RATE:-50}" "$(dirname "$0")/run-growth.sh"

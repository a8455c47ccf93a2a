"""Fit the fleet simulator's cost model to this machine's engine steps (agentserve/sim/fit.py).

    python bench/fit_costs.py --model bench --out agentserve/sim/profiles/cpu-bench.json
"""

from agentserve.sim.fit import main

if __name__ == "__main__":
    main()

"""The auto-pruning search: settings, fitness, evolution, baselines, trial store, Pareto front, the run loop."""

"""Load tests: a locustfile and a headless runner with pass/fail thresholds."""

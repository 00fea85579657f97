"""fewstep's test suite (a package: helpers are imported as `tests.tiny`, `tests.dist.bundles`)."""

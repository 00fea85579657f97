"""The export check: pipelines run in a process that never imports fewstep."""

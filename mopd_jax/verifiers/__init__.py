"""Host verifiers: one protocol (`verify(example, completion) -> Verdict`), a registry, a process pool."""

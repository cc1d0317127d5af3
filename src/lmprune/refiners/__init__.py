"""Block-level methods: they refine a whole block after its layers were pruned one by one."""

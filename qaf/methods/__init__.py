"""Compression methods: one ``Method`` subclass per family (see ``qaf.methods.base``)."""

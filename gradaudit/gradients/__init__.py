"""What the adversary observes: gradient snapshots, their capture, and their spectrum."""

"""Research commands behind `bench`, `dpsweep`, `scan` and `bench --overhead`: not library API."""

"""MIB's circuit track (hannamw/MIB-circuit-track) from patchsweep's runs: its names (`names`), its
submission (`export`: `driver.py mib-export`) and its results table (`scores`: `driver.py mib-scores`).
Its datasets come in through jobs/datasets/mib.py (`driver.py make-mib`)."""

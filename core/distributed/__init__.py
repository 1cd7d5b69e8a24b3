"""Scale-out over Ray: the plan cut into work units (split.py), one engine per worker actor
(worker.py, started by cluster.py), and the driver that feeds them and journals their rows
(driver.py). Only cluster.py and driver.py import Ray, and only when a job scales out."""

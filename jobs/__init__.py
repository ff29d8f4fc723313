"""Driver side: the pair file, the job, sharding, Ray orchestration and the Parquet store."""
from jobs.pairfile import InvalidLine, PairFile, PairFileError, read_pairs

__all__ = ["InvalidLine", "PairFile", "PairFileError", "read_pairs"]

"""Driver side: the pair file, the job, sharding, Ray orchestration and the Parquet store."""

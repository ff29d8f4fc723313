"""Results of a run: aggregation, the HTML report, SQL queries over the tables."""

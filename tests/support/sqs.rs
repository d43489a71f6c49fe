//! Private sqs server for tests (see the sqs sink and source tests).

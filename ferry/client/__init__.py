"""Python clients for Ferry services: numpy in, numpy out, Ferry errors out."""

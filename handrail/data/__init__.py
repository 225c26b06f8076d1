"""What a problem is and how an answer is judged.

records    a record (prompt, solution, answer), its file formats, its prompts for student and teacher
datafile   records from a file of any size (streamed, indexed, cached)
answers    finding the final answer in a completion, strict and lenient; answer-before-work detection
verifiers  the built-in verifiers and a user's own (`module:function`)
tasks      the embedded arithmetic tasks the lab trains on

It imports only the engine and the package's top-level helpers.
"""

"""An OpenAI-SDK agent for the vLLM test: three calls, each continuing the conversation (its reply,
then "more"), so each episode is one token sequence built from three exact generations."""


async def agent(client, record):
    messages = [{"role": "user", "content": record.prompt}]
    for _ in range(3):
        reply = (await client.chat.completions.create(model="policy", messages=messages, max_tokens=4)).choices[0].message
        messages += [reply.model_dump(exclude_none=True), {"role": "user", "content": "more"}]
    return 1.0 if "a" in messages[-2]["content"] else 0.0
